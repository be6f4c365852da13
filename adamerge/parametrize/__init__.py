"""Learnable parametrisations of a merge: coefficients (task- or layer-wise)."""

from adamerge.parametrize.coefficients import GRANULARITIES, Coefficients

__all__ = ["GRANULARITIES", "Coefficients"]
