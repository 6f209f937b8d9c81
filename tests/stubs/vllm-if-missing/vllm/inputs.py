"""Test-only stand-in for vllm.inputs."""


def TokensPrompt(**kwargs):  # noqa: N802 (vLLM's name; a TypedDict there)
    return dict(kwargs)
