"""Learnable parametrisations of a merge: coefficients (task- or layer-wise), Concrete masks, WEMoE's routers and
Surgery's adapters — the last two with the export extensions that serve them (registered on import)."""

from adamerge.parametrize import routing, surgery  # noqa: F401  (registers their export extensions)
from adamerge.parametrize.coefficients import GRANULARITIES, Coefficients
from adamerge.parametrize.concrete import ConcreteMask

__all__ = ["GRANULARITIES", "Coefficients", "ConcreteMask"]
