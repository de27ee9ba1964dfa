"""slm: distill, prune and quantize large language models into small, fast ones."""

__version__ = "0.1.0"
