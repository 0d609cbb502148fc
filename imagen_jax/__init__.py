"""imagen_jax: text-to-image diffusion in JAX/Flax (cascaded pixel and latent models)."""

__version__ = "0.1.0"
