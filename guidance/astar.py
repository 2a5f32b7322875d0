"""A-STAR: attention segregation and retention losses that move the latent (docs/methods.md, section 2).

Per concept m (a group of text tokens), A^m is its map at the map grid, averaged over the chosen
layers and heads (``AttentionMapCapture``), then normalised (below). Per image:

    L_seg = sum_{m > n} sum_ij min(A^m, A^n)_ij / sum_ij (A^m + A^n)_ij                 (Eq. 2)
    L_ret = sum_m [1 - sum_ij min(A^m, B^m)_ij / sum_ij (A^m + B^m)_ij]                 (Eq. 3)
    z_t' = z_t - alpha_t grad_z (w_seg L_seg + w_ret L_ret),  then z_t' is denoised to z_{t-1}

B^m is the binarised map of the previous guided step (detached), or a user layout mask.

Choices the paper leaves open, with their defaults:
- normalisation "softmax" (Attend-and-Excite's): the maps of the prompt's content tokens (start,
  end and padding tokens left out) x100, softmax over those tokens, a concept's map the sum of its
  tokens'; then Gaussian smoothing (3 x 3, sigma 0.5, reflect padding; A&E's kernel formula has an
  effective sigma of 0.5 sqrt 2) and division by the map's maximum, so that maps lie in [0, 1] as B
  does. "max" skips the softmax.
- binarisation "otsu" (Otsu's threshold per map), or a number tau: B = A >= tau (A's max is 1).
"""

from __future__ import annotations


import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from attnsteer.attention_processors import AttentionMapCapture, steering, wrapped

from .auxiliary import auxiliary_call, in_auxiliary_call
from .perturbation import BranchInfo, _take_rows

NORMALIZE = ("softmax", "max")
EPS = 1e-8


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Each ``[..., h, w]`` map convolved with a normalised size x size Gaussian (reflect padding)."""
    if size <= 1 or sigma <= 0:
        return maps
    x = torch.arange(size, dtype=maps.dtype, device=maps.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(g, g) / g.sum() ** 2
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    flat = F.pad(flat, [size // 2] * 4, mode="reflect")
    return F.conv2d(flat, kernel[None, None]).reshape(maps.shape)


def concept_maps(token_maps: torch.Tensor, membership: torch.Tensor, token_valid: torch.Tensor | None = None,
                 normalize: str = "softmax", temperature: float = 100.0, smoothing: tuple[int, float] = (3, 0.5)) -> torch.Tensor:
    """``[rows, concepts, h, w]`` in [0, 1] from the maps of each row's tokens ``[rows, tokens, h, w]``.

    membership: ``[rows, concepts, tokens]``, 1 where a token belongs to a concept (all-zero rows are
    padding concepts); token_valid: ``[rows, tokens]``, False for padding tokens, which the softmax
    leaves out.
    """
    if normalize == "softmax":
        logits = token_maps * temperature
        if token_valid is not None:
            logits = logits.masked_fill(~token_valid[:, :, None, None], float("-inf"))
        token_maps = torch.softmax(logits, dim=1)
    maps = torch.einsum("rkc,rchw->rkhw", membership.to(token_maps.dtype), token_maps)
    maps = gaussian_smooth(maps, *smoothing)
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(EPS)


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` ``[N, P]``: the split maximising between-class variance."""
    v, _ = values.sort(dim=-1)
    n = v.shape[-1]
    count = torch.arange(1, n, device=v.device, dtype=v.dtype)
    below = v.cumsum(-1)[..., :-1]
    mean_below, mean_above = below / count, (v.sum(-1, keepdim=True) - below) / (n - count)
    between = count * (n - count) * (mean_below - mean_above) ** 2
    return v.gather(-1, between.argmax(-1, keepdim=True)).squeeze(-1)


def binarize(maps: torch.Tensor, rule: str | float = "otsu") -> torch.Tensor:
    """0/1 masks of the high-activation regions of ``[..., h, w]`` maps in [0, 1]: above Otsu's
    threshold (``"otsu"``) or at least ``rule`` (a number in (0, 1])."""
    flat = maps.detach().flatten(-2)
    if rule == "otsu":
        mask = flat > otsu_threshold(flat.reshape(-1, flat.shape[-1])).reshape(*flat.shape[:-1], 1)
    else:
        mask = flat >= rule
    return mask.to(maps.dtype).reshape(maps.shape)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum min(a, b) / sum (a + b) over the last two dimensions."""
    return torch.minimum(a, b).sum((-2, -1)) / (a + b).sum((-2, -1)).clamp_min(EPS)


def segregation_loss(maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[rows]``: Eq. 2 over the pairs of valid concepts of each row; maps ``[rows, K, h, w]``, valid ``[rows, K]``."""
    pairs = _overlap(maps[:, :, None], maps[:, None, :])
    k = maps.shape[1]
    lower = torch.ones(k, k, dtype=torch.bool, device=maps.device).tril(-1)
    keep = lower & valid[:, :, None] & valid[:, None, :]
    return (pairs * keep).sum((1, 2))


def retention_loss(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[rows]``: Eq. 3, each valid concept's map against its mask ``[rows, K, h, w]``."""
    return ((1 - _overlap(maps, masks)) * valid).sum(1)


SCHEDULES = ("sqrt", "constant")


def _sample_key(args: tuple, kwargs: dict) -> int | str:
    """Where a denoiser call's latent input is: args[0], or the keyword of UNets / transformers."""
    if args:
        return 0
    return next(k for k in ("sample", "hidden_states") if k in kwargs)


def _with_sample(args: tuple, kwargs: dict, sample: torch.Tensor) -> tuple[tuple, dict]:
    key = _sample_key(args, kwargs)
    if key == 0:
        return (sample, *args[1:]), kwargs
    return args, {**kwargs, key: sample}


def _sample(args: tuple, kwargs: dict) -> torch.Tensor:
    key = _sample_key(args, kwargs)
    return args[0] if key == 0 else kwargs[key]


@contextmanager
def frozen_parameters(model: torch.nn.Module):
    """Parameters need no gradient in a ``with`` block (only the latent does); restored after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass
class _Step:
    """What one denoising step of the attached pipeline has seen and decided."""

    guided: bool = False  # the first forward of the step came (and did its update, if in the window)
    scaled: tuple | None = None  # (latents given to scheduler.scale_model_input, that function at t)
    shift: torch.Tensor | None = None  # z' - z in the model input's scale, per latent row
    delta: torch.Tensor | None = None  # z' - z


class AStarGuidance:
    """A-STAR on one pipeline call (see the module docstring for the losses and their options).

    concepts: per prompt, a list of concepts, each a list of text-key indices; context: per prompt,
    the content tokens the "softmax" normalisation runs over (a prompt's concept tokens are always
    added); layers, grid: the map layers and their grid (``map_layers``); scale: alpha;
    window: (start, stop) fractions of the steps that are guided; schedule: "sqrt" (alpha_t =
    scale sqrt(linspace(1, 0.5, T))_t, A&E's) or "constant"; iterations: gradient steps per guided
    step; weights: (w_seg, w_ret); masks: None, or per prompt a [concepts, H, W] layout mask (any
    resolution; resized to the grid by area, then >= 0.5) used instead of the retention masks;
    early_stop: end the gradient forward after the last map layer; checkpointing: gradient
    checkpointing in the gradient forward (activations of the model's blocks recomputed in the
    backward: less memory, more time; on also when the model has diffusers' checkpointing enabled).

    The latent update (``attached``): the first denoiser call of each step (the conditional one)
    first runs a gradient pass on the conditional rows only: z as a leaf, through the pipeline's own
    ``scheduler.scale_model_input`` when it calls one, the denoiser up to the last map layer with
    parameters frozen, the loss per image, z' = z - alpha_t grad_z (sum of the images' losses; the
    images are independent in the forward, so each image's loss moves only its own latent). Every
    call of that step then gets z' in place of z (the same shift on each CFG half or branch), and
    ``scheduler.step`` gets ``sample = z'``: the scheduler steps from z' exactly, for any scheduler,
    and the pipeline's loop, callbacks and progress bar are untouched.
    """

    def __init__(self, concepts: list[list[list[int]]], layers: list[str], grid: tuple[int, ...],
                 context: list[list[int]] | None = None, scale: float = 20.0, window: tuple[float, float] = (0.0, 1.0),
                 schedule: str = "sqrt", iterations: int = 1, weights: tuple[float, float] = (1.0, 1.0),
                 normalize: str = "softmax", temperature: float = 100.0, smoothing: tuple[int, float] = (3, 0.5),
                 binarization: str | float = "otsu", masks: list | None = None, early_stop: bool = True,
                 checkpointing: bool = False):
        self.concepts = [[list(c) for c in prompt] for prompt in concepts]
        self.context = context or [[] for _ in concepts]
        self.layers, self.grid = list(layers), tuple(grid)
        self.scale, self.window, self.schedule, self.iterations = float(scale), tuple(window), schedule, int(iterations)
        self.weights, self.normalize, self.temperature = tuple(weights), normalize, float(temperature)
        self.smoothing, self.binarization, self.early_stop = tuple(smoothing), binarization, early_stop
        self.checkpointing = checkpointing
        self.masks = masks
        self.step, self.retained, self.losses = 0, None, []

    @property
    def enabled(self) -> bool:
        return self.scale != 0 and any(self.concepts) and any(self.weights)

    def in_window(self, step: int, num_steps: int) -> bool:
        start, stop = self.window
        return start <= step / max(num_steps, 1) < stop

    def alpha(self, step: int, num_steps: int) -> float:
        if self.schedule == "constant":
            return self.scale
        return self.scale * math.sqrt(1.0 - 0.5 * step / max(num_steps - 1, 1))

    def rows(self, n: int) -> dict:
        """Per latent row (prompt p repeated n / prompts times): the capture's token groups (one per
        token), membership [n, K, C], token_valid [n, C], valid [n, K] and layout masks (or None)."""
        prompts = len(self.concepts)
        if n % prompts:
            raise ValueError(f"{prompts} prompts' concepts do not divide the {n} latent rows")
        tokens = [sorted(set(ctx) | {i for c in concepts for i in c}) for concepts, ctx in zip(self.concepts, self.context)]
        k, c = max(map(len, self.concepts)), max(map(len, tokens))
        membership, token_valid = torch.zeros(prompts, k, c), torch.zeros(prompts, c, dtype=torch.bool)
        valid = torch.zeros(prompts, k, dtype=torch.bool)
        for p, concepts in enumerate(self.concepts):
            token_valid[p, : len(tokens[p])] = True
            valid[p, : len(concepts)] = True
            for m, concept in enumerate(concepts):
                membership[p, m, [tokens[p].index(i) for i in concept]] = 1.0
        masks = None
        if self.masks is not None:
            masks = torch.zeros(prompts, k, *self.grid)
            for p, mask in enumerate(self.masks):
                area = F.interpolate(torch.as_tensor(mask, dtype=torch.float32)[None], size=self.grid, mode="area")[0]
                masks[p, : area.shape[0]] = (area >= 0.5).float()
        repeat = n // prompts
        expand = lambda t: None if t is None else t.repeat_interleave(repeat, 0)
        groups = [[[i] for i in row] for row in tokens for _ in range(repeat)]
        return dict(groups=groups, membership=expand(membership), token_valid=expand(token_valid), valid=expand(valid),
                    masks=expand(masks))

    def loss(self, maps: dict[str, torch.Tensor], rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per image [n], concept maps [n, K, h, w]) from the captured ``{layer: [n, C, h, w]}``."""
        token_maps = torch.stack([maps[name].float() for name in self.layers]).mean(0)
        concepts = concept_maps(token_maps, rows["membership"].to(token_maps.device), rows["token_valid"].to(token_maps.device),
                                self.normalize, self.temperature, self.smoothing)
        valid = rows["valid"].to(concepts.device)
        w_seg, w_ret = self.weights
        loss = w_seg * segregation_loss(concepts, valid)
        masks = rows["masks"] if rows["masks"] is not None else self.retained
        if masks is not None and w_ret:
            loss = loss + w_ret * retention_loss(concepts, masks.to(concepts), valid)
        return loss, concepts

    def gradient(self, maps_at, z: torch.Tensor, rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_z of the summed per-image losses, concept maps); ``maps_at(leaf)`` runs the gradient forward."""
        leaf = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, concepts = self.loss(maps_at(leaf), rows)
            grad = torch.autograd.grad(loss.sum(), leaf)[0]
        self.losses.append(loss.detach())
        return grad, concepts.detach()

    def update(self, maps_at, z: torch.Tensor, num_steps: int) -> torch.Tensor:
        """z' after ``iterations`` gradient steps; the first one's maps give the next step's masks."""
        rows, alpha = self.rows(z.shape[0]), self.alpha(self.step, num_steps)
        retained = None
        for _ in range(self.iterations):
            grad, concepts = self.gradient(maps_at, z, rows)
            z = z - alpha * grad
            retained = binarize(concepts, self.binarization) if retained is None else retained
        self.retained = retained
        return z

    @contextmanager
    def attached(self, model: torch.nn.Module, scheduler, branch_info: Callable[[torch.nn.Module], BranchInfo]):
        """Guide a pipeline's ``model`` and ``scheduler`` for a ``with`` block (see the class docstring)."""
        capture = AttentionMapCapture(self.layers)
        state = _Step()
        self.step, self.retained, self.losses = 0, None, []

        def scale_model_input(original):
            def scaled(sample, *args, **kwargs):
                state.scaled = (sample, lambda s: original(s, *args, **kwargs))
                return original(sample, *args, **kwargs)

            return scaled

        def step(original):
            def stepped(*args, **kwargs):
                nonlocal state
                if state.delta is not None:
                    if "sample" in kwargs:
                        kwargs["sample"] = kwargs["sample"] + state.delta
                    else:
                        args = (*args[:2], args[2] + state.delta, *args[3:])
                state = _Step()
                self.step += 1
                return original(*args, **kwargs)

            return stepped

        def guided(forward):
            def run(*args, **kwargs):
                if in_auxiliary_call():
                    return forward(*args, **kwargs)
                if not state.guided:
                    state.guided = True
                    info = branch_info(model)
                    if self.in_window(self.step, info.num_steps):
                        self._guide(model, forward, capture, state, args, kwargs, info)
                if state.shift is None:
                    return forward(*args, **kwargs)
                x = _sample(args, kwargs)
                if x.shape[0] % state.shift.shape[0] or x.shape[1:] != state.shift.shape[1:]:
                    raise RuntimeError(f"A-STAR: a denoiser call of this step has input {tuple(x.shape)}, which is not "
                                       f"a stack of the {tuple(state.shift.shape)} latents it updated")
                shift = state.shift.repeat(x.shape[0] // state.shift.shape[0], *[1] * (x.dim() - 1))
                args, kwargs = _with_sample(args, kwargs, x + shift.to(x.dtype))
                return forward(*args, **kwargs)

            return run

        with ExitStack() as stack:
            stack.enter_context(steering(model, [capture]))
            stack.enter_context(wrapped(model, "forward", guided))
            if hasattr(scheduler, "scale_model_input"):
                stack.enter_context(wrapped(scheduler, "scale_model_input", scale_model_input))
            stack.enter_context(wrapped(scheduler, "step", step))
            yield self

    def _guide(self, model, forward, capture: AttentionMapCapture, state: _Step, args, kwargs, info: BranchInfo) -> None:
        """The gradient pass of one step on the conditional rows; sets ``state.delta`` and ``state.shift``."""
        x = _sample(args, kwargs)
        n = x.shape[0]
        cond = info.cond_rows(n)
        latents, scale = state.scaled if state.scaled is not None and state.scaled[0].shape == x.shape else (x, lambda s: s)
        z = latents[cond.to(latents.device)]
        cond_args, cond_kwargs = _take_rows(args, cond, n), _take_rows(kwargs, cond, n)
        groups = self.rows(z.shape[0])["groups"]

        def maps_at(leaf):
            a, k = _with_sample(cond_args, cond_kwargs, scale(leaf))
            with auxiliary_call(), capture.checkpointing(model, self.checkpointing):
                return capture.collect(lambda: forward(*a, **k), groups, grad=True, stop=self.early_stop)

        with frozen_parameters(model):  # also over the backward, where checkpointed blocks recompute
            z_new = self.update(maps_at, z, info.num_steps).detach()
        state.delta, state.shift = z_new - z, scale(z_new) - scale(z)
