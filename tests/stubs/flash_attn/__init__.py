"""Test-only stand-in for flash_attn (CUDA-only). See tests/stubs/README.md."""

__version__ = "0.0.0+cpu-stub"
