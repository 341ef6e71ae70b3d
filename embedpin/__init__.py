"""embedpin: pin a diffusion model's prompt conditioning to a visual target."""

__version__ = "0.1.0"
