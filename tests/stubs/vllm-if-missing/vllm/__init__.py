"""Test-only stand-in for vllm (CUDA-only). See tests/stubs/README.md."""

__version__ = "0.0.0+cpu-stub"


class SamplingParams:
    """Keeps the keyword arguments it was given, as tests may inspect them."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class LLM:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vllm stand-in: generation needs the real vLLM (GPU)")
