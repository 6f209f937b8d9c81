"""`openrlhf-passk tiny-model`: loads offline with transformers and OpenRLHF, chat template on maze
prompts, exact text round trip, generation, determinism from the seed, size, and the CLI's refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from conftest import REAL_VLLM

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from openrlhf_passk import tiny_model  # noqa: E402
from openrlhf_passk.tasks import maze  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def load(path: Path):
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tok, AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    tiny_model.add_arguments(parser)
    return tiny_model.run(parser.parse_args(argv))


def test_loads_offline_small_float32_long_context(model_dir: Path) -> None:
    tok, model = load(model_dir)
    assert model.dtype == torch.float32
    assert model.config.max_position_embeddings >= 2048  # OpenRLHF's default --data.max_len
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id != tok.pad_token_id
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    assert size < 3_000_000, size


@pytest.mark.parametrize("hidden", [64, 128])
def test_attention_heads_are_32_wide_which_vllm_cpu_runs(hidden: int, tmp_path: Path) -> None:
    """CPU mode rolls this model out on vLLM-CPU, whose attention has no 16-wide kernel."""
    config = load(tiny_model.build(tmp_path / "model", hidden=hidden))[1].config
    assert config.hidden_size // config.num_attention_heads == 32 == tiny_model.HEAD_DIM
    if REAL_VLLM:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        assert 32 in CPUAttentionBackend.get_supported_head_sizes()


def test_chat_template_and_exact_round_trip_on_maze_prompts(model_dir: Path) -> None:
    tok, _ = load(model_dir)
    grid = maze.generate(15, 3).grid  # the largest default training size
    prompt = maze.render_prompt(grid)
    chat = tok.apply_chat_template(
        maze.render_messages(grid, system="Be brief."), tokenize=False, add_generation_prompt=True
    )
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat == expected
    # OpenRLHF passes content as a list of parts when a prompt has <image> tags: same text.
    parts = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == f"<|im_start|>user\n{prompt}<|im_end|>\n"

    for text in (prompt, chat, "<answer>RRDDLU</answer>", "tabs\tand ünïcödé ✓ 🙂\r\n"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok(chat)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # each marker is one token
    assert len(ids) < 1024  # one token per byte still fits OpenRLHF's default --data.prompt_max_len
    # The largest maze the generator makes (41x41, ~2,400 tokens) still fits the model's context.
    largest = tok(maze.render_prompt(maze.generate(maze.MAX_SIZE, 0).grid))["input_ids"]
    assert len(largest) + 512 < tok.model_max_length <= load(model_dir)[1].config.max_position_embeddings


def test_openrlhf_loads_the_tokenizer_and_builds_prompts(model_dir: Path) -> None:
    utils = pytest.importorskip("openrlhf.utils.utils")
    prompts = pytest.importorskip("openrlhf.datasets.prompts_dataset")
    tok = utils.get_tokenizer(str(model_dir), None, "left", None)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    prompt = maze.render_prompt(maze.generate(7, 1).grid)
    built = prompts.preprocess_data({"input": prompt}, input_key="input", apply_chat_template=tok.apply_chat_template)
    text = built[0] if isinstance(built, tuple) else built
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_generate_on_a_left_padded_batch(model_dir: Path) -> None:
    tok, model = load(model_dir)
    tok.padding_side = "left"
    texts = ["<|im_start|>user\nhi<|im_end|>\n", "a longer prompt, padded on the left"]
    batch = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=True, top_p=1.0, temperature=1.0)
    assert out.shape[0] == 2 and 0 < out.shape[1] - batch["input_ids"].shape[1] <= 6
    assert int(out.max()) < len(tok)


def test_same_seed_same_weights_and_callers_rng_untouched(model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = tiny_model.build(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)  # building does not reseed the caller's RNG

    other = tiny_model.build(tmp_path / "other", seed=1)
    weights = [load(path)[1].state_dict() for path in (model_dir, again, other)]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not torch.equal(weights[0]["model.embed_tokens.weight"], weights[2]["model.embed_tokens.weight"])


def test_cli_refuses_non_empty_out_without_force_and_bad_sizes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert cli(["--out", str(tmp_path / "bad"), "--hidden", "50"]) == 2
    assert "--hidden must be a multiple of 32" in capsys.readouterr().err
    assert cli(["--out", str(tmp_path / "bad"), "--layers", "0"]) == 2
    assert "--layers must be an integer from 1 to 64" in capsys.readouterr().err
    assert cli(["--out", str(tmp_path / "bad"), "--seed", str(2**64)]) == 2
    assert "--seed must be an integer from 0 to 2**63 - 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    (tmp_path / "file").write_text("")
    assert cli(["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err

    assert cli(["--out", str(out), "--force", "--layers", "1", "--hidden", "32", "--seed", "7"]) == 0
    assert "wrote a 1-layer, width-32 Llama" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "keep me"
    _, model = load(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
