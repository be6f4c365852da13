"""Learnable parametrisations of a merge: coefficients (task- or layer-wise)."""

from adamerge.parametrize.coefficients import GRANULARITIES, Coefficients
from adamerge.parametrize.concrete import ConcreteMask

__all__ = ["GRANULARITIES", "Coefficients", "ConcreteMask"]
