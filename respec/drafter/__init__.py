"""Drafters: the EAGLE-3-style head and a standalone draft LM behind one interface."""

from .base import DraftContext, Drafter, Proposal
from .draft_lm import DraftModelDrafter
from .eagle import DrafterError, EagleConfig, EagleDrafter, EagleHead, default_feature_layers, load_eagle, save_eagle

__all__ = [
    "DraftContext", "Drafter", "Proposal", "DraftModelDrafter", "DrafterError", "EagleConfig",
    "EagleDrafter", "EagleHead", "default_feature_layers", "load_eagle", "save_eagle",
]
