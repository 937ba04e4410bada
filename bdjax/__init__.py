"""Blended Diffusion for text-driven editing of natural images, in JAX/Flax."""

__version__ = "0.1.0"
