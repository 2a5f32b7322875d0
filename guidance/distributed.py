"""The process group of a run launched with ``accelerate launch`` or ``torchrun`` (one process otherwise)."""

import torch


def process_state():
    """accelerate's ``PartialState``. Without CUDA it is told ``cpu=True``, or processes launched by
    ``accelerate launch --multi_gpu`` / ``torchrun`` would each run alone instead of joining over gloo
    (``accelerate launch --cpu`` starts a single process whatever ``--num_processes`` says)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
