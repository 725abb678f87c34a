"""dreambooth: teach a Stable Diffusion model one new subject from a handful of photos."""

__version__ = "0.1.0"
