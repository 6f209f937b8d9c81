"""Test-only stand-in: the names OpenRLHF imports; padding-free packing is not available on CPU."""

from einops import rearrange  # noqa: F401  (OpenRLHF imports rearrange from here)


def _unavailable(*args, **kwargs):
    raise NotImplementedError("flash_attn stand-in: sample packing needs the real flash_attn (GPU)")


index_first_axis = pad_input = unpad_input = _unavailable
