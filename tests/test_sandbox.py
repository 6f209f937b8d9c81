"""`openrlhf-passk sandbox`: a short configuration end to end (plot, JSON, checkpoints), checked against
brute-force pass@k over its saved per-maze counts, and reproducible from its seed."""

from __future__ import annotations

import itertools
import json

import pytest

from openrlhf_passk.cli import main

# 5x5 mazes have paths of 2-6 moves: after 100 SFT steps the tiny model solves some held-out mazes and
# not others, so the brute-force check below has something to check (and RL sees non-zero advantages).
SHORT = ["sandbox", "--sizes", "5", "--train-mazes", "28", "--test-mazes", "6", "--sft-steps", "100",
         "--sft-batch", "32", "--sft-lr", "3e-3", "--rl-steps", "2", "--prompts-per-step", "4", "--n-samples", "4",
         "--k", "2", "--eval-n", "4", "--threads", "1"]


def brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n responses (c of them correct) that hold at least one correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sandbox")
    assert main([*SHORT, "--seed", "3", "--out", str(out)]) == 0
    return out, json.loads((out / "sandbox.json").read_text())


def test_short_run_writes_plot_json_and_checkpoints(short_run):
    out, summary = short_run
    assert (out / "sandbox.png").stat().st_size > 1000
    assert summary["seed"] == 3 and summary["settings"]["k"] == 2
    assert summary["num_test_mazes"] == 6 and summary["num_train_mazes"] == 28
    assert set(summary["runs"]) == {"sft", "grpo", "passk"}
    assert set(summary["timings_s"]) >= {"sft_s", "rl_grpo_s", "rl_passk_s", "total_s"}
    assert len(summary["sft_loss"]) == 100
    for name in ("grpo", "passk"):
        assert [h["step"] for h in summary["runs"][name]["history"]] == [0, 1]
    for name in ("sft", "grpo", "passk"):
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
    cmp = summary["comparison"]
    assert cmp["k_max"] == 4
    assert cmp["passk_ge_grpo_at_k_max"] == (cmp["pass@4"]["passk"] >= cmp["pass@4"]["grpo"])
    # Held-out mazes were written for `eval --model` and never appear among the training grids.
    assert len((out / "test.jsonl").read_text().splitlines()) == 6


def test_short_run_pass_at_k_matches_brute_force(short_run):
    _, summary = short_run
    counts = [m["c"] for r in summary["runs"].values() for m in r["counts"]]
    assert any(c > 0 for c in counts), "the short run solved nothing: the check below would be vacuous"
    for run in summary["runs"].values():
        assert run["ks"] == [1, 2, 4]
        assert all(m["n"] == 4 and 0 <= m["c"] <= 4 for m in run["counts"])
        for k in run["ks"]:
            want = sum(brute_force(m["n"], m["c"], k) for m in run["counts"]) / len(run["counts"])
            assert run["overall"][str(k)] == pytest.approx(want, abs=1e-9)
        assert run["overall"] == run["by_size"]["5"]  # one size: the overall curve is that size's


def test_checkpoints_load_in_eval(short_run, tmp_path):
    out, _ = short_run
    argv = ["eval", "--model", str(out / "passk"), "--data", str(out / "test.jsonl"), "--backend", "hf",
            "--n", "2", "--max-new-tokens", "12", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert json.loads((tmp_path / "passk.json").read_text())["num_mazes"] == 6


def test_same_seed_same_result(short_run, tmp_path):
    _, first = short_run
    assert main([*SHORT, "--seed", "3", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "sandbox.json").read_text())
    assert again["sft_loss"] == first["sft_loss"]
    for name in ("sft", "grpo", "passk"):
        assert again["runs"][name]["counts"] == first["runs"][name]["counts"]
        assert again["runs"][name].get("history") == first["runs"][name].get("history")


def test_bad_settings_exit_cleanly(tmp_path, capsys):
    assert main(["sandbox", "--n-samples", "4", "--k", "8", "--out", str(tmp_path)]) == 2
    assert "--k 8 must be between 1 and --n-samples 4" in capsys.readouterr().err
    assert main(["sandbox", "--sizes", "6", "--out", str(tmp_path)]) == 2
    assert "odd" in capsys.readouterr().err
