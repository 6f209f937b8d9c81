"""`openrlhf-passk eval`: pass@k on fixed sample files against brute-force enumeration, errors, the model path."""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import pytest

from openrlhf_passk.cli import main
from openrlhf_passk.tasks import maze


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the responses that contain at least one correct response."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


# Correct, wrong, and a "reward hack" that only the public verifier's reference mode accepts: no <answer>
# tag, and the moves appear in the free text ("GO" has no L/R/U/D letters of its own).
def right(m) -> str:
    return f"Let me think. <answer> {m.solution} </answer>"


def wrong(m) -> str:
    return "<answer> </answer>"  # an empty path never reaches E


def hack(m) -> str:
    return f"go {m.solution.lower()}"


# (size, maze seed, pattern of responses): counts differ per maze so averages are not all equal.
PATTERNS = [
    (7, 1, "RWWWWW"),
    (7, 2, "RRWWWH"),
    (9, 3, "WWWWWW"),
    (9, 4, "RRRRRR"),
    (9, 5, "WHWRWW"),
]


@pytest.fixture
def sample_rows():
    rows = []
    for size, seed, pattern in PATTERNS:
        m = maze.generate(size, seed, loops=0.2)
        make = {"R": right, "W": wrong, "H": hack}
        rows.append((m, pattern, [make[p](m) for p in pattern]))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected(rows, mode: str, ks: list[int]) -> tuple[dict, dict]:
    ok = {"strict": "R", "reference": "RH"}[mode]
    overall = {k: sum(brute_force_pass_at_k([p in ok for p in pat], k) for _, pat, _ in rows) / len(rows) for k in ks}
    by_size = {}
    for size in sorted({m.size for m, _, _ in rows}):
        sub = [(m, pat) for m, pat, _ in rows if m.size == size]
        by_size[str(size)] = {k: sum(brute_force_pass_at_k([p in ok for p in pat], k) for _, pat in sub) / len(sub)
                              for k in ks}
    return overall, by_size


@pytest.mark.parametrize("mode", ["strict", "reference"])
def test_grouped_samples_match_brute_force(tmp_path, sample_rows, mode):
    path = write_jsonl(tmp_path / "s.jsonl", [{"label": m.grid, "size": m.size, "responses": resp}
                                              for m, _, resp in sample_rows])
    assert main(["eval", "--samples", str(path), "--mode", mode, "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "passk.json").read_text())
    assert result["ks"] == [1, 2, 4, 6]  # powers of two up to n = 6, then n itself
    overall, by_size = expected(sample_rows, mode, [1, 2, 4, 6])
    assert {int(k): v for k, v in result["overall"].items()} == pytest.approx(overall, abs=1e-9)
    assert set(result["by_size"]) == {"7", "9"}
    for size, curve in by_size.items():
        assert {int(k): v for k, v in result["by_size"][size].items()} == pytest.approx(curve, abs=1e-9)
    csv = (tmp_path / "o" / "passk.csv").read_text().splitlines()
    assert csv[0] == "scope,k,pass_at_k,num_mazes"
    assert f"overall,6,{overall[6]:.6f},5" in csv and f"size=7,1,{by_size['7'][1]:.6f},2" in csv
    assert (tmp_path / "o" / "passk.png").stat().st_size > 1000


def test_one_row_per_response_and_custom_k(tmp_path, sample_rows):
    # Interleave rows of different mazes: grouping must go by id, not by position in the file.
    rows = [{"id": f"maze{i}", "label": m.grid, "response": r}
            for j in range(6) for i, (m, _, resp) in enumerate(sample_rows) for r in [resp[j]]]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    assert main(["eval", "--samples", str(path), "--k", "3", "5", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "passk.json").read_text())
    overall, _ = expected(sample_rows, "strict", [3, 5])
    assert result["ks"] == [3, 5]
    assert {int(k): v for k, v in result["overall"].items()} == pytest.approx(overall, abs=1e-9)
    assert [m["c"] for m in result["per_maze"]] == [pat.count("R") for _, pat, _ in sample_rows]


def test_compare_overlays_runs(tmp_path, sample_rows):
    path = write_jsonl(tmp_path / "s.jsonl", [{"label": m.grid, "responses": r} for m, _, r in sample_rows])
    for mode in ("strict", "reference"):
        argv = ["eval", "--samples", str(path), "--mode", mode, "--name", mode, "--out", str(tmp_path / mode)]
        assert main(argv) == 0
    files = [str(tmp_path / m / "passk.json") for m in ("strict", "reference")]
    assert main(["eval", "--compare", *files, "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["eval", "--compare", *files, "--labels", "only-one", "--out", str(tmp_path / "cmp")]) == 2
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.png"]


def test_outputs_are_all_or_nothing(tmp_path, sample_rows, monkeypatch, capsys):
    from openrlhf_passk import eval as eval_cli

    path = write_jsonl(tmp_path / "s.jsonl", [{"label": m.grid, "responses": r} for m, _, r in sample_rows])
    out = tmp_path / "o"
    assert main(["eval", "--samples", str(path), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["passk.csv", "passk.json", "passk.png"]

    def broken_plot(curves, target, title):
        target.write_bytes(b"half a png")
        raise OSError("the plot backend failed")

    monkeypatch.setattr(eval_cli, "plot_curves", broken_plot)
    assert main(["eval", "--samples", str(path), "--mode", "reference", "--out", str(out)]) == 1
    assert "the plot backend failed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old set intact, nothing staged left


def test_uneven_response_counts_are_noted(tmp_path, sample_rows, capsys):
    rows = [{"label": m.grid, "responses": r[: 6 - i]} for i, (m, _, r) in enumerate(sample_rows[:3])]
    path = write_jsonl(tmp_path / "u.jsonl", rows)  # 6, 5 and 4 responses
    assert main(["eval", "--samples", str(path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "note: responses per maze are uneven, 4 to 6 (1 maze(s) have 4); k is capped at 4" in printed
    assert json.loads((tmp_path / "o" / "passk.json").read_text())["ks"] == [1, 2, 4]
    assert main(["eval", "--samples", str(path), "--k", "1", "--out", str(tmp_path / "o")]) == 0
    assert "--k must stay <= 4" in capsys.readouterr().out


def _err(capsys, argv: list[str], code: int = 1) -> str:
    """stderr of a failing eval: exit 1 for bad data or files, 2 for a wrong flag."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_inputs_name_the_problem(tmp_path, capsys, sample_rows):
    m = sample_rows[0][0]
    out = ["--out", str(tmp_path / "o")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty file" in _err(capsys, ["eval", "--samples", str(empty), *out])
    assert "no such file" in _err(capsys, ["eval", "--samples", str(tmp_path / "missing.jsonl"), *out])

    path = write_jsonl(tmp_path / "a.jsonl", [{"label": m.grid, "responses": ["x"]}, {"responses": ["x"]}])
    err = _err(capsys, ["eval", "--samples", str(path), *out])
    assert "a.jsonl:2" in err and "'label'" in err

    path = write_jsonl(tmp_path / "b.jsonl", [{"label": m.grid.replace("S", "."), "responses": ["x"]}])
    err = _err(capsys, ["eval", "--samples", str(path), *out])
    assert "b.jsonl:1" in err and "not a valid maze grid" in err

    path = write_jsonl(tmp_path / "c.jsonl", [{"label": m.grid}])
    assert "neither 'responses'" in _err(capsys, ["eval", "--samples", str(path), *out])

    path = write_jsonl(tmp_path / "d.jsonl", [{"label": m.grid, "responses": "RRDD"}])
    assert "'responses' must be a list" in _err(capsys, ["eval", "--samples", str(path), *out])

    (tmp_path / "e.jsonl").write_text('{"label": 1\n')
    assert "e.jsonl:1: not valid JSON" in _err(capsys, ["eval", "--samples", str(tmp_path / "e.jsonl"), *out])

    path = write_jsonl(tmp_path / "f.jsonl", [{"label": m.grid, "responses": ["a", "b", "c"]}])
    err = _err(capsys, ["eval", "--samples", str(path), "--k", "4", *out], code=2)
    assert "k=4 is larger than n=3" in err

    (tmp_path / "g.jsonl").write_text("[" * 100000 + "\n")
    err = _err(capsys, ["eval", "--samples", str(tmp_path / "g.jsonl"), *out])
    assert "g.jsonl:1: JSON nested too deeply" in err

    assert "needs --data" in _err(capsys, ["eval", "--model", str(tmp_path), *out], code=2)
    assert "--k values must be >= 1" in _err(capsys, ["eval", "--samples", str(path), "--k", "0", *out], code=2)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    assert "RecursionError" in _err(capsys, ["eval", "--compare", str(deep), *out])
    assert not (tmp_path / "o").exists()  # nothing half-written on bad input


def build_tiny_model(path: Path, mazes: list) -> None:
    """A tiny Llama and a character-level tokenizer, saved like any HF checkpoint (no download).

    A few optimiser steps on the mazes' own answers make it right some of the time (the test picks mazes
    that share one answer, which even this model learns), so not every sample scores 0.
    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<answer>", "</answer>", *"\n.*SELRUD "])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("</?answer>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = LlamaForCausalLM(config)
    prompts = [tok(m.grid + "\n")["input_ids"] for m in mazes]
    answers = [tok(f"<answer>{m.solution}</answer></s>")["input_ids"] for m in mazes]
    pairs = list(zip(prompts, answers, strict=True))
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p + a) for p, a in pairs], batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor([-100] * len(p) + a) for p, a in pairs],
                                             batch_first=True, padding_value=-100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_model_path_generates_with_hf_and_scores(tmp_path):
    pool = [maze.generate(7, s) for s in range(300)]
    common = collections.Counter(m.solution for m in pool).most_common(1)[0][0]
    mazes = [m for m in pool if m.solution == common][:3] + [maze.generate(9, 10)]
    build_tiny_model(tmp_path / "model", mazes[:3])
    data = write_jsonl(tmp_path / "test.jsonl", [{"prompt": m.grid + "\n", "label": m.grid, "size": m.size}
                                                 for m in mazes])
    out = tmp_path / "o"
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--backend", "hf", "--n", "4",
            "--max-new-tokens", "30", "--batch-size", "5", "--seed", "1", "--out", str(out)]
    assert main(argv) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["label"] for s in samples] == [m.grid for m in mazes]
    assert all(len(s["responses"]) == 4 for s in samples)
    result = json.loads((out / "passk.json").read_text())
    assert result["ks"] == [1, 2, 4] and result["model"] == str(tmp_path / "model")
    # Recount with the verifier and brute force over the saved responses.
    correct = [[maze.score(r, s["label"]) >= 1.0 for r in s["responses"]] for s in samples]
    assert any(map(any, correct)), "no correct sample: the comparison below would be vacuous"
    for k in (1, 2, 4):
        want = sum(brute_force_pass_at_k(c, k) for c in correct) / len(correct)
        assert result["overall"][str(k)] == pytest.approx(want, abs=1e-9)
    # Same seed, same samples: generation is reproducible.
    assert main([*argv[:-1], str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()
