"""STADI: diffusion inference on mixed GPU fleets (core: API, GPU catalogue, planner, CLI)."""

__version__ = "0.1.0"
