"""FIFO-Diffusion's queue of latent frames at increasing noise levels, for flow-matching video models.

The queue holds L = f * n latent frames (f: the model's clip length in latent frames, n: partitions).
With the descending sigma schedule s_0 > s_1 > ... > s_{L-1} > s_L = 0 of L steps, slot j (0 = head,
the oldest frame) sits at sigma s_{L-1-j}: the tail at s_0, the noisiest. One FIFO step moves every
slot one level down with the Euler update x + (s_next - s) v, v the model's velocity computed on
windows of f consecutive slots, each frame at its own timestep; then the head, now at sigma 0, leaves
the queue and fresh noise enters at the tail.

Without lookahead the n windows tile the queue (n model calls a step), so the first frames of the
head window have no cleaner frames before them. With lookahead (the paper's lookahead denoising)
c = f // 2 context slots sit before the head: they hold the last c frames that left the queue, shown
to the model at the head's sigma s_{L-1}, and are read, never written. Windows of f slots run over
context + queue at stride f - c, each writing only its later f - c slots, so every queue slot, the
head included, is denoised with at least c cleaner frames before it: 2n model calls a step for an
even f (for an odd f, ceil(L / (f - c)) <= 2n, the last window moved back to end at the tail).
All windows of a step read the queue as it was before the step.
"""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def context_slots(window: int, lookahead: bool) -> int:
    """The slots lookahead keeps before the head: f // 2 for a window of f latent frames, else none."""
    return window // 2 if lookahead else 0


def windows(length: int, window: int, lookahead: bool) -> list[tuple[int, int, int]]:
    """(start, first written slot, stop) of each model call of one step, over the context slots and then
    the ``length`` queue slots (indices count the context slots first)."""
    context = context_slots(window, lookahead)
    if window > context + length:
        raise ValueError(f"a window of {window} latent frames does not fit a queue of {length}")
    stride = window - context
    calls = []
    for write in range(context, context + length, stride):
        stop = min(write + stride, context + length)
        calls.append((stop - window, write, stop))
    return calls


def initial_queue(clip: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor, context: int = 0) -> torch.Tensor:
    """The warm-up queue [B, C, context + L, H, W] (``noise`` of that shape): the clean ``clip``
    [B, C, f, H, W] placed in the last f slots and its first frame in every slot before them, the
    context slots included, each slot noised to its sigma ((1 - s) x + s noise). The first L - f
    frames that leave the queue are warm-up and are discarded."""
    slots, f = noise.shape[2], clip.shape[2]
    source = (torch.arange(slots) - (slots - f)).clamp_min(0)
    s = slot_sigmas(sigmas, slots - context, context).to(noise).view(1, 1, -1, 1, 1)
    return (1 - s) * clip[:, :, source] + s * noise


def slot_sigmas(sigmas: torch.Tensor, length: int, context: int = 0) -> torch.Tensor:
    """[context + L]: the sigma of each slot, head to tail, the context slots at the head's
    (``sigmas``: the L + 1 values of the schedule)."""
    queue = sigmas[:length].flip(0)
    return torch.cat([queue[:1].expand(context), queue])


def fifo_step(queue: torch.Tensor, sigmas: torch.Tensor, window: int, lookahead: bool, velocity: Velocity) -> torch.Tensor:
    """The queue (context slots first) one level less noisy: ``velocity(latents [B, C, f, H, W], slot
    sigmas [f], start, first written slot)`` for each window of the step, the Euler update on the slots
    it writes; the context slots are left as they are."""
    context = context_slots(window, lookahead)
    length = queue.shape[2] - context
    now = slot_sigmas(sigmas, length, context)
    after = torch.cat([now[:context], sigmas[1:length + 1].flip(0)])
    out = queue.clone()
    for start, write, stop in windows(length, window, lookahead):
        v = velocity(queue[:, :, start:stop], now[start:stop], start, write)
        step = (after[write:stop] - now[write:stop]).to(queue).view(1, 1, -1, 1, 1)
        out[:, :, write:stop] = queue[:, :, write:stop] + step * v[:, :, write - start:].to(queue)
    return out


class PromptSchedule:
    """Prompts over the frames of a video: ``ranges`` [(start, stop, prompt)], video frames, stop
    exclusive, that tile [0, frames) in order. Around each boundary the embedding passes linearly from
    one prompt to the next over ``blend`` frames (0: a hard cut)."""

    def __init__(self, ranges, frames: int, blend: int = 0):
        if not isinstance(ranges, (list, tuple)) or not ranges:
            raise ValueError(f"a prompt schedule is a list of (start, stop, prompt) frame ranges, got {ranges!r}")
        position = 0
        for item in ranges:
            if (not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[2], str)
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in item[:2])):
                raise ValueError(f"prompt schedule item {item!r} is not (start, stop, prompt)")
            start, stop, _ = item
            if start != position or stop <= start:
                what = "overlaps the range before it" if start < position else "leaves a gap" if start > position else "is empty"
                raise ValueError(f"prompt schedule range ({start}, {stop}) {what}: the ranges must cover frames "
                                 f"0 to {frames} in order, each starting where the one before stops")
            position = stop
        if position != frames:
            raise ValueError(f"the prompt schedule ends at frame {position}, but the video has {frames} frames")
        if isinstance(blend, bool) or not isinstance(blend, int) or blend < 0:
            raise ValueError(f"prompt blend {blend!r} must be a whole number of frames >= 0")
        self.prompts = [p for _, _, p in ranges]
        self.bounds = [stop for _, stop, _ in ranges[:-1]]
        self.blend = blend

    def weights(self, frame: float) -> torch.Tensor:
        """[prompts]: each prompt's weight at video frame ``frame`` (they sum to 1): past boundary k by a
        share that ramps from 0 to 1 over the blend, prompt k keeps share(k - 1) - share(k)."""
        if self.blend == 0:
            shares = [float(frame >= bound) for bound in self.bounds]
        else:
            shares = [min(max((frame - bound) / self.blend + 0.5, 0.0), 1.0) for bound in self.bounds]
        shares = [1.0, *shares, 0.0]
        return torch.tensor([a - b for a, b in zip(shares, shares[1:])])


def low_pass(shape: tuple[int, int, int], spatial: float, temporal: float, device=None) -> torch.Tensor:
    """[F, H, W]: a Gaussian low-pass filter over the FFT frequencies of a (frames, h, w) latent, each
    axis' frequency scaled to [-1, 1) (1 = Nyquist): exp(-(fh^2 + fw^2) / (2 spatial^2) - ft^2 / (2 temporal^2))."""
    f, h, w = (torch.fft.fftfreq(n, device=device) * 2 for n in shape)
    d = (h[:, None] ** 2 + w[None, :] ** 2)[None] / (2 * spatial**2) + (f ** 2)[:, None, None] / (2 * temporal**2)
    return torch.exp(-d)


def coherent_tail(previous: torch.Tensor, noise: torch.Tensor, spatial: float = 0.25, temporal: float = 1.0) -> torch.Tensor:
    """Ouroboros' coherent tail sampling: the low frequencies of ``previous`` (the queue's last latent,
    taken at its own noise level rather than re-noised: for flow matching the tail sits at sigma ~ 1,
    where re-noising would erase it) and the high frequencies of fresh ``noise``, both [B, C, F, H, W]."""
    lpf = low_pass(tuple(noise.shape[2:]), spatial, temporal, noise.device)
    dims = (-3, -2, -1)
    mixed = torch.fft.fftn(previous.float(), dim=dims) * lpf + torch.fft.fftn(noise.float(), dim=dims) * (1 - lpf)
    return torch.fft.ifftn(mixed, dim=dims).real.to(noise.dtype)
