"""`openrlhf-passk sandbox`: a tiny configuration end to end (every arm, summary schema, figure, checkpoints),
pass@k and the seed statistics checked against brute force, the sampling temperature in PPO's log-probs, and
held-out mazes whose wall layouts never occur in training."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch

from openrlhf_passk import advantages, sandbox
from openrlhf_passk.cli import main

ARMS = ["sft", "grpo", "passk", "passk_anneal", "passk_simko"]
if "passk_adaptive" in advantages.available():  # the estimator is new; the arm is opt-in
    ARMS.append("passk_adaptive")

# 5x5 mazes have 4 wall layouts (40 grids): one layout is held out (10 grids), three train (30 grids). Paths
# are 2-6 moves, so after 100 SFT steps the tiny model solves some held-out mazes and not others.
SHORT = ["sandbox", "--sizes", "5", "--train-mazes", "28", "--test-mazes", "6", "--sft-steps", "100",
         "--sft-batch", "32", "--sft-lr", "3e-3", "--rl-steps", "3", "--prompts-per-step", "4", "--n-samples", "4",
         "--k", "2", "--eval-n", "4", "--curve-every", "2", "--curve-mazes", "3", "--threads", "1",
         "--arms", *ARMS]


def brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n responses (c of them correct) that hold at least one correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sandbox")
    assert main([*SHORT, "--seeds", "3", "4", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_short_run_writes_summary_figure_and_checkpoints(short_run):
    out, summary = short_run
    assert (out / "summary.png").stat().st_size > 1000
    assert summary["settings"]["seeds"] == [3, 4] and summary["settings"]["k"] == 2
    assert [(r["seed"], r["arm"]) for r in summary["runs"]] == [(s, a) for s in (3, 4) for a in ARMS]
    for run in summary["runs"]:
        assert len(run["counts"]) == 6 and all(n == 4 and 0 <= c <= 4 for n, c in run["counts"])
        assert 0 < run["entropy"] < math.log(14)  # 14 tokens in the vocabulary
        assert 0 <= run["distinct_correct"] <= max(c for _, c in run["counts"])
        assert run["curve"]["step"] == [0, 2, 3] if run["arm"] != "sft" else run["curve"]["step"] == [0]
        assert set(run["curve"]) == {"step", "pass@1", "pass@4", "entropy"}
        if run["arm"] != "sft":
            assert [h["step"] for h in run["history"]] == [0, 1, 2]
    anneal = next(r for r in summary["runs"] if r["arm"] == "passk_anneal")
    assert [h["k"] for h in anneal["history"]] == [advantages.k_schedule(s, k_start=2, total_steps=3) for s in range(3)]
    for seed in (3, 4):
        assert set(summary["timings_s"][str(seed)]) >= {"data_s", "sft_s", "rl_grpo_s", "total_s"}
        for arm in ARMS:
            ckpt = out / f"seed{seed}" / arm
            assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
        assert len((out / f"seed{seed}" / "test.jsonl").read_text().splitlines()) == 6
    # Contract C6: CPU mode rolls the SFT checkpoint out at OpenRLHF's lengths.
    config = json.loads((out / "seed3" / "sft" / "config.json").read_text())
    assert config["max_position_embeddings"] >= 2048


def test_pass_at_k_and_seed_statistics_match_brute_force(short_run):
    _, summary = short_run
    assert any(c > 0 for r in summary["runs"] for _, c in r["counts"]), "nothing solved: the check would be vacuous"
    for run in summary["runs"]:
        assert list(run["pass_at_k"]) == ["1", "2", "3", "4"]
        for k in range(1, 5):
            want = sum(brute_force(n, c, k) for n, c in run["counts"]) / len(run["counts"])
            assert run["pass_at_k"][str(k)] == pytest.approx(want, abs=1e-9)
    runs = {(r["arm"], r["seed"]): r for r in summary["runs"]}
    for arm in ARMS:
        a, b = runs[(arm, 3)]["pass_at_k"]["4"], runs[(arm, 4)]["pass_at_k"]["4"]
        got = summary["aggregate"]["per_arm"][arm]["pass@4"]
        assert got["mean"] == pytest.approx((a + b) / 2) and got["se"] == pytest.approx(abs(a - b) / 2)
        if arm != "grpo":
            d = [runs[(arm, s)]["pass_at_k"]["1"] - runs[("grpo", s)]["pass_at_k"]["1"] for s in (3, 4)]
            got = summary["aggregate"]["paired_vs_grpo"][arm]["pass@1"]
            assert got["mean"] == pytest.approx(sum(d) / 2) and got["se"] == pytest.approx(abs(d[0] - d[1]) / 2)


def test_checkpoints_load_in_eval(short_run, tmp_path):
    out, _ = short_run
    argv = ["eval", "--model", str(out / "seed3" / "passk"), "--data", str(out / "seed3" / "test.jsonl"),
            "--backend", "hf", "--n", "2", "--max-new-tokens", "12", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert json.loads((tmp_path / "passk.json").read_text())["num_mazes"] == 6


def test_one_seed_alone_reproduces_that_seed(short_run, tmp_path):
    """Each seed's run depends on its seed only: `--seed 4` alone gives seed 4 of the two-seed run."""
    _, first = short_run
    assert main([*SHORT, "--seed", "4", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    before = [r for r in first["runs"] if r["seed"] == 4]
    assert [(r["arm"], r["counts"], r["curve"], r.get("history")) for r in again["runs"]] == [
        (r["arm"], r["counts"], r["curve"], r.get("history")) for r in before]
    # Seeds run apart merge into the summary of the joint run.
    alone3 = tmp_path / "seed3only"
    alone3.mkdir()
    part = {**first, "runs": [r for r in first["runs"] if r["seed"] == 3],
            "settings": {**first["settings"], "seeds": [3]}}
    (alone3 / "summary.json").write_text(json.dumps(part))
    merged = tmp_path / "merged"
    assert main(["sandbox", "--merge", str(alone3), str(tmp_path), "--out", str(merged)]) == 0
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["runs"] == first["runs"] and summary["aggregate"] == first["aggregate"]
    assert (merged / "summary.png").stat().st_size > 1000
    assert main(["sandbox", "--merge", str(tmp_path), str(tmp_path), "--out", str(merged)]) == 2


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked distribution, so that temperature changes it a lot
        model.lm_head.weight.mul_(40)
    return model


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_ppo_log_probs_are_those_of_the_sampling_distribution(temperature):
    """PPO's old log-probs must be those of the distribution the tokens were drawn from, softmax(logits / T).
    The seed code left out the division (log_softmax(logits)); that fails both checks below at T != 1."""
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, mask, sampled_lp, _ = sandbox.sample(model, prompt, 1, temperature, gen, pad=0, eos=5)
    scored = sandbox.response_log_probs(model, prompt, tokens, temperature)
    assert torch.allclose(scored[mask], sampled_lp[mask], atol=1e-5)
    # And the sampler really draws from it: the first token's frequencies against exp(log-prob), 4000 draws.
    probs = torch.zeros(6)
    probs[tokens[:, 0]] = scored[:, 0].exp()
    freq = torch.bincount(tokens[:, 0], minlength=6).float() / len(tokens)
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / len(tokens))
    untempered = torch.log_softmax(model(input_ids=prompt[:1]).logits[0, -1], -1)[tokens[0, 0]]
    assert abs(untempered.item() - scored[0, 0].item()) > 0.05  # the check above can tell the two apart


def data_args(**kw) -> argparse.Namespace:
    base = {"sizes": [7], "loops": 0.3, "train_mazes": 1000, "test_mazes": 100, "test_layouts": 0.25,
            "prompts_per_step": 16}
    return argparse.Namespace(**{**base, **kw})


def test_held_out_mazes_use_wall_layouts_no_training_maze_uses():
    from openrlhf_passk.tasks import maze

    held_out = []
    for seed in (0, 1):
        train, test, notes = sandbox.make_data(data_args(), seed)
        assert len(train) == 1000 and len(test) == 100
        assert len({m.grid for m in train + test}) == 1100
        blank = str.maketrans({"S": ".", "E": "."})
        train_layouts = {m.grid.translate(blank) for m in train}
        test_layouts = {m.grid.translate(blank) for m in test}
        assert not train_layouts & test_layouts
        swapped = {m.grid.translate(str.maketrans({"S": "E", "E": "S"})) for m in test}
        assert not swapped & {m.grid for m in train}  # no test maze is a training maze with S and E swapped
        held_out.append(test_layouts)
        assert notes[0]["test_layouts"] >= len(test_layouts)
    assert held_out[0] != held_out[1]  # each seed holds out other layouts
    # The note's layout count, recounted from the generator over the same draws.
    recount = {maze.generate(7, s, loops=0.3).grid.translate(blank) for s in range(notes[0]["draws"])}
    assert notes[0]["layouts"] == len(recount) and notes[0]["test_layouts"] == round(0.25 * len(recount))


def test_asking_for_more_mazes_than_exist_is_a_clear_error(tmp_path, capsys):
    """5x5 at loops 0.3 has 4 wall layouts and 40 grids; one layout (10 grids) is held out, so 30 can train."""
    argv = ["sandbox", "--sizes", "5", "--train-mazes", "35", "--test-mazes", "5", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only 30 distinct 5x5 train mazes exist (3 of the 4 wall layouts" in err
    assert "lower --train-mazes to 30" in err


def test_bad_settings_exit_cleanly(tmp_path, capsys):
    assert main(["sandbox", "--n-samples", "4", "--k", "8", "--out", str(tmp_path)]) == 2
    assert "--k 8 must be between 1 and --n-samples 4" in capsys.readouterr().err
    assert main(["sandbox", "--sizes", "6", "--out", str(tmp_path)]) == 2
    assert "odd" in capsys.readouterr().err
    assert main(["sandbox", "--simko-tau", "1", "--out", str(tmp_path)]) == 2
    assert "--simko-tau 1.0 must be in [0, 1)" in capsys.readouterr().err
    assert main(["sandbox", "--train-mazes", "8", "--prompts-per-step", "16", "--out", str(tmp_path)]) == 2
    assert "--train-mazes 8 is below --prompts-per-step 16" in capsys.readouterr().err
