"""fedjax_lm: federated pre-training of decoder-only language models in JAX."""

__version__ = "0.1.0"
