"""Floor 2: objectives and update rules: how predictions combine, losses, search, scorers."""

from .astar import AStarGuidance
from .perturbation import BranchInfo, HeadPerturbationGuidance, combine

__all__ = ["AStarGuidance", "BranchInfo", "HeadPerturbationGuidance", "combine"]
