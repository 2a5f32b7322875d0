"""Floor 2: objectives and update rules: how predictions combine, losses, search, scorers."""

from .perturbation import BranchInfo, HeadPerturbationGuidance, combine

__all__ = ["BranchInfo", "HeadPerturbationGuidance", "combine"]
