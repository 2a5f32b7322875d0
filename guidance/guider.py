"""Head perturbation guidance as a diffusers guider, for modular pipelines.

Modular pipelines ask their guider for the batches of a step (``prepare_inputs``), run the denoiser
once per batch between ``prepare_models`` and ``cleanup_models``, then combine (``__call__``). This
guider adds a "pred_cond_perturbed" batch built from the conditional inputs, whatever CFG does,
and steers the chosen heads only while that batch runs.

    pipe.update_components(guider=HeadPerturbationGuider(heads=["transformer_blocks.3.attn:0"], guidance_scale=5.0))

Heads are checked against the denoiser when the first perturbed batch is prepared (the guider does
not see the model before).
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from attnsteer.attention_processors import HeadPerturbation, head_weights, list_layers, resolve_heads, steering

from .perturbation import check_options

COND, UNCOND, PERTURBED = "pred_cond", "pred_uncond", "pred_cond_perturbed"


class HeadPerturbationGuider(BaseGuidance):
    """eps_u + g (eps_c - eps_u) + w (eps_c - eps_perturbed); CFG within [start, stop), the
    perturbation within [perturbation_start, perturbation_stop) (fractions of the steps)."""

    _input_predictions = [COND, UNCOND, PERTURBED]

    @register_to_config
    def __init__(self, heads: list[str] | str = (), guidance_scale: float = 7.5, perturbation_scale: float = 5.0,
                 softpag_u: float = 1.0, perturbation_mode: str = "joint", perturbation_start: float = 0.0,
                 perturbation_stop: float = 1.0, guidance_rescale: float = 0.0, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.perturbation_scale, self.u, self.window = check_options(
            perturbation_scale, softpag_u, perturbation_mode, (perturbation_start, perturbation_stop), "batched",
            window_name="(perturbation_start, perturbation_stop)")
        self.heads = heads if isinstance(heads, str) else list(heads)
        self.guidance_scale, self.mode, self.guidance_rescale = guidance_scale, perturbation_mode, guidance_rescale
        self._order: list[str] = []
        self._stack: ExitStack | None = None

    def _in(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _cfg_on(self) -> bool:
        return self._enabled and self._in(self._start, self._stop) and not math.isclose(self.guidance_scale, 1.0)

    def _perturbation_on(self) -> bool:
        return (self._enabled and bool(self.heads) and self.u > 0 and self.perturbation_scale != 0
                and self._in(*self.window))

    @property
    def num_conditions(self) -> int:
        return 1 + self._cfg_on() + self._perturbation_on()

    @property
    def is_conditional(self) -> bool:
        return self._order[max(self._count_prepared - 1, 0)] != UNCOND

    def _batches(self) -> list[tuple[str, int]]:
        order = [(COND, 0)] + [(UNCOND, 1)] * self._cfg_on() + [(PERTURBED, 0)] * self._perturbation_on()
        self._order = [name for name, _ in order]
        return order

    def prepare_inputs(self, data):
        return [self._prepare_batch(data, index, name) for name, index in self._batches()]

    def prepare_inputs_from_block_state(self, data, input_fields):
        return [self._prepare_batch_from_block_state(input_fields, data, index, name) for name, index in self._batches()]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._order[self._count_prepared - 1] != PERTURBED:
            return
        layers = list_layers(denoiser)
        heads = resolve_heads(self.heads, layers)
        steer = HeadPerturbation(heads, self.mode)
        steer.set_weights(head_weights(heads, layers, self.u))
        self._stack = ExitStack()
        self._stack.enter_context(steering(denoiser, [steer]))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def forward(self, pred_cond, pred_uncond=None, pred_cond_perturbed=None) -> GuiderOutput:
        pred = pred_cond if pred_uncond is None else pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if pred_cond_perturbed is not None:
            pred = pred + self.perturbation_scale * (pred_cond - pred_cond_perturbed)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
