"""Placement: which device holds which tensor, and whether it fits."""
