"""lorank: representation collapse, low-rank learning and GaLore in JAX."""

__version__ = "0.1.0"
