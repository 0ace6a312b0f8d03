"""Spatial Forcing: align a VLA policy's visual tokens with a frozen 3D foundation model."""

__version__ = "0.1.0"
