"""`openrlhf-passk tiny-model`: a small, randomly initialised causal LM and tokenizer, saved offline.

For trying the real pipeline on a laptop (CPU mode, dry runs, tests): nothing is downloaded. The model is
a Llama (float32, 2 layers of width 64, 2 heads of 32, by default; about 0.6 MB) whose weights depend only
on the seed.
The tokenizer is byte-level with no merges, so every text (maze grids included) round-trips exactly,
plus ChatML's `<|im_start|>`/`<|im_end|>` and a chat template, so `--data.apply_chat_template` works.

    openrlhf-passk tiny-model --out models/tiny [--layers 2 --hidden 64 --seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MAX_POSITIONS = 4096  # OpenRLHF's default --data.max_len is 2048: leave room above it
# vLLM-CPU's attention takes head sizes 32, 64, 80, ... (not 16): CPU mode rolls this model out on it.
HEAD_DIM = 32
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML. Content may also be a list of parts, as OpenRLHF builds for `<image>` prompts: keep the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    f"{IM_START}{{{{ message['role'] }}}}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    f"{IM_END}\n"
    "{% endfor %}"
    f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}"
)


def build(out: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write the model and tokenizer to `out` (created; files of the same name are overwritten); return `out`.

    ValueError names the parameter when layers is not in 1..64, hidden not a multiple of 32 in 32..4096,
    or seed outside 0..2**63 - 1.
    """
    for name, value, low, high in (("layers", layers, 1, 64), ("hidden", hidden, HEAD_DIM, 4096)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    if hidden % HEAD_DIM:
        raise ValueError(f"hidden must be a multiple of {HEAD_DIM} (the attention head size), got {hidden}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1 (torch.manual_seed's range), got {seed!r}")

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # One token per byte (the 256 printable stand-ins of byte-level BPE), no merges: any UTF-8 text
    # encodes, and decoding gives it back exactly. Maze prompts are ~700 tokens, well inside the context.
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, IM_START, IM_END])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private copy of the RNG state, so building a model does not reseed the caller's torch.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name and the template as a separate file; older transformers
    # (as in many vLLM installs) know only PreTrainedTokenizerFast and read the template from here.
    config_path = out / "tokenizer_config.json"
    saved = json.loads(config_path.read_text())
    saved.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(saved, indent=2) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--out", required=True, type=Path, help="directory to write (must be empty or new)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (1-64)")
    parser.add_argument(
        "--hidden", type=int, default=64, help=f"hidden size, a multiple of {HEAD_DIM} (the head size), up to 4096"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of this seed")
    parser.add_argument(
        "--force", action="store_true", help="write into a non-empty --out, overwriting the files of the same name"
    )


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"openrlhf-passk tiny-model: error: --out {out} is a file; give a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(
            f"openrlhf-passk tiny-model: error: --out {out} is not empty; choose a new directory or pass "
            "--force to overwrite the model files in it",
            file=sys.stderr,
        )
        return 2
    try:
        build(out, layers=args.layers, hidden=args.hidden, seed=args.seed)
    except ValueError as err:
        print(f"openrlhf-passk tiny-model: error: --{err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"openrlhf-passk tiny-model: error: cannot write --out {out}: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote a {args.layers}-layer, width-{args.hidden} Llama and tokenizer to {out} ({size / 1e6:.1f} MB)")
    return 0
