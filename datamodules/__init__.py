"""LightningDataModules, one per data set of the studies."""

from .moons import MoonsDataModule

__all__ = ["MoonsDataModule"]
