"""detr_jax: DETR (DEtection TRansformer) in JAX/Flax, numerically faithful to the reference."""

__version__ = "0.1.0"
