"""Adaptive speculation: cost profile, online acceptance model, controller (plain Python)."""

from .controller import AcceptanceModel, AdaptiveK, CostProfile

__all__ = ["AcceptanceModel", "AdaptiveK", "CostProfile"]
