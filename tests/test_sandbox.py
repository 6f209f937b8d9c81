"""`openrlhf-passk sandbox`: a tiny configuration end to end (every arm, two seeds in parallel processes, summary
schema, figure, checkpoints), pass@k, the per-seed contrasts and the seed interval checked against brute force and
scipy, the k schedules, the sampling temperature in PPO's log-probs, held-out mazes whose wall layouts are no
rotation or reflection of a training layout, merging, the protocol check, and the flag errors."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from openrlhf_passk import advantages, sandbox
from openrlhf_passk.cli import main

REPO = Path(__file__).resolve().parent.parent
ARMS = ["sft", "grpo", "passk", "passk_then_grpo", "passk_linear", "passk_simko"]
if "passk_adaptive" in advantages.available():
    ARMS.append("passk_adaptive")

# 5x5 mazes have 4 wall layouts (40 grids), all in one symmetry class, so this tiny run holds out by exact layout:
# one layout (10 grids) is held out, three train (30 grids). Paths are 2-6 moves, so after 100 SFT steps the tiny
# model solves some held-out mazes and not others.
SHORT = ["sandbox", "--sizes", "5", "--holdout", "layout", "--train-mazes", "28", "--test-mazes", "6",
         "--sft-steps", "100", "--sft-batch", "32", "--sft-lr", "3e-3", "--rl-steps", "4", "--prompts-per-step", "4",
         "--n-samples", "4", "--k", "2", "--eval-n", "4", "--curve-every", "2", "--curve-mazes", "3", "--curve-n", "4",
         "--curve-k", "2", "--resamples", "200", "--threads", "1", "--arms", *ARMS]


def brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n responses (c of them correct) that hold at least one correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sandbox")
    assert main([*SHORT, "--seeds", "3", "4", "--jobs", "2", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_short_run_writes_summary_figure_and_checkpoints(short_run):
    out, summary = short_run
    assert (out / "summary.png").stat().st_size > 1000
    assert summary["settings"]["seeds"] == [3, 4] and summary["settings"]["k"] == 2
    assert [(r["seed"], r["arm"]) for r in summary["runs"]] == [(s, a) for s in (3, 4) for a in ARMS]
    for run in summary["runs"]:
        assert len(run["counts"]) == 6 and all(n == 4 and 0 <= c <= 4 for n, c in run["counts"])
        assert all(0 < e < math.log(14) for e in run["maze_entropy"])  # 14 tokens in the vocabulary
        assert all(d <= c for d, (_, c) in zip(run["maze_distinct"], run["counts"], strict=True))
        assert run["curve"]["step"] == ([0, 2, 4] if run["arm"] != "sft" else [0])
        assert set(run["curve"]) == {"step", "pass@1", "pass@2", "entropy"}
        if run["arm"] != "sft":
            assert [h["step"] for h in run["history"]] == [0, 1, 2, 3]
            assert all(h["mean_abs_adv"] >= 0 and 0 <= h["zero_adv_groups"] <= 1 for h in run["history"])
    for seed in (3, 4):
        assert set(summary["timing"]["per_seed"][str(seed)]) >= {"data_s", "sft_s", "rl_grpo_s", "total_s", "cpu_s"}
        for arm in ARMS:
            ckpt = out / f"seed{seed}" / arm
            assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
        lines = (out / f"seed{seed}" / "test.jsonl").read_text().splitlines()
        assert len(lines) == 6 and summary["test_sets"][str(seed)]["cluster"] == [
            json.loads(line)["layout_class"] for line in lines]
    assert summary["protocol"]["matches"] in (False, None)  # a 5x5 toy is not the protocol's design


def test_train_jsonl_holds_the_training_mazes_in_the_test_rows_format(short_run):
    """seedN/train.jsonl: --train-mazes rows with test.jsonl's keys, prompt = grid + newline, each a distinct maze
    whose wall layout is no held-out one (--holdout layout here), in make_data's order."""
    out, summary = short_run
    train, _, _, _ = sandbox.make_data(resolved(*SHORT[1:], "--seeds", "3"), 3)
    for seed in (3, 4):
        test_rows = [json.loads(line) for line in (out / f"seed{seed}" / "test.jsonl").read_text().splitlines()]
        rows = [json.loads(line) for line in (out / f"seed{seed}" / "train.jsonl").read_text().splitlines()]
        assert len(rows) == 28 and all(set(r) == set(test_rows[0]) for r in rows)
        assert all(r["prompt"] == r["label"] + "\n" and r["layout_class"] is None and r["size"] == 5 for r in rows)
        assert len({r["label"] for r in rows}) == 28
        assert not {sandbox.layout(r["label"]) for r in rows} & {sandbox.layout(r["label"]) for r in test_rows}
        if seed == 3:
            assert [r["label"] for r in rows] == [m.grid for m in train]
            assert [r["solution"] for r in rows] == [m.solution for m in train]


def test_k_schedules_of_the_two_phase_and_linear_arms(short_run):
    """4 RL steps from k = 2: the step schedule switches to 1 at --switch-at 0.5 (step 2); the linear one is
    round(2 - step / 4) half up: 2, 2 (1.75), 2 (1.5), 1 (1.25)."""
    _, summary = short_run
    ks = {r["arm"]: [h["k"] for h in r["history"]] for r in summary["runs"] if r["seed"] == 3 and "history" in r}
    assert ks["passk_then_grpo"] == [2, 2, 1, 1]
    assert ks["passk_linear"] == [2, 2, 2, 1]
    assert ks["passk"] == [2, 2, 2, 2] and ks["grpo"] == [1, 1, 1, 1]


def test_pass_at_k_and_contrasts_match_brute_force(short_run):
    _, summary = short_run
    assert any(c > 0 for r in summary["runs"] for _, c in r["counts"]), "nothing solved: the check would be vacuous"
    for run in summary["runs"]:
        assert list(run["pass_at_k"]) == ["1", "2", "3", "4"]
        for k in range(1, 5):
            want = sum(brute_force(n, c, k) for n, c in run["counts"]) / len(run["counts"])
            assert run["pass_at_k"][str(k)] == pytest.approx(want, abs=1e-9)
    runs = {(r["arm"], r["seed"]): r for r in summary["runs"]}
    for arm in ARMS:
        a, b = (runs[(arm, s)]["pass_at_k"]["4"] for s in (3, 4))
        got = summary["aggregate"][arm]["pass@4"]
        assert got["mean"] == pytest.approx((a + b) / 2) and got["se"] == pytest.approx(abs(a - b) / 2)
    found = 0
    for c in summary["statistics"]["secondary"]:
        if c["metric"] != "pass@4":
            continue
        found += 1
        per_seed = [np.mean([brute_force(4, ca, 4) - brute_force(4, cb, 4) for (_, ca), (_, cb)
                             in zip(runs[(c["a"], s)]["counts"], runs[(c["b"], s)]["counts"], strict=True)])
                    for s in (3, 4)]
        assert list(c["per_seed"].values()) == pytest.approx(per_seed, abs=1e-12)
        if np.std(per_seed) > 0:
            want = stats.t.interval(0.95, 1, loc=np.mean(per_seed), scale=stats.sem(per_seed))
            assert c["t_interval"] == pytest.approx(want)
        assert 0 < c["permutation_p"] <= 1
    assert found == len(ARMS) - 2 + len(ARMS) - 1 + 3  # vs grpo, vs sft, and the three arm-vs-arm contrasts
    primary = summary["statistics"]["primary"]
    assert [(p["a"], p["b"], p["metric"]) for p in primary] == [
        ("passk", "grpo", "pass@16"), ("passk_then_grpo", "grpo", "pass@1"), ("passk", "grpo", "entropy")]
    assert primary[0]["verdict"].startswith("not run")  # eval_n 4 has no pass@16
    # Holm over the two endpoints that ran, by hand: the smaller p doubled, the larger one not below it.
    p1, p2 = primary[1]["permutation_p"], primary[2]["permutation_p"]
    low, high = min(2 * min(p1, p2), 1), min(max(2 * min(p1, p2), max(p1, p2)), 1)
    assert sorted([primary[1]["holm_p"], primary[2]["holm_p"]]) == pytest.approx([low, high])
    footing = summary["statistics"]["equal_footing"]["per_arm"]
    grpo_start = np.mean([np.mean([h["mean_abs_adv"] for h in runs[("grpo", s)]["history"][:1]]) for s in (3, 4)])
    assert footing["grpo"]["start"] == pytest.approx(grpo_start)


def test_checkpoints_load_with_auto_classes_and_in_eval(short_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = short_run
    model = AutoModelForCausalLM.from_pretrained(out / "seed3" / "sft")
    tok = AutoTokenizer.from_pretrained(out / "seed3" / "sft")
    config = model.config
    assert config.max_position_embeddings >= 2048  # contract C6: CPU mode rolls it out at OpenRLHF's lengths
    assert config.hidden_size // config.num_attention_heads in sandbox.VLLM_CPU_HEAD_SIZES
    assert tok.decode(tok("<answer>LR</answer>", add_special_tokens=False)["input_ids"]) == "<answer>LR</answer>"
    argv = ["eval", "--model", str(out / "seed3" / "passk"), "--data", str(out / "seed3" / "test.jsonl"),
            "--backend", "hf", "--n", "2", "--max-new-tokens", "12", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert json.loads((tmp_path / "passk.json").read_text())["num_mazes"] == 6


def test_one_seed_alone_reproduces_that_seed_and_merges(short_run, tmp_path, capsys):
    """Each seed's run depends on its seed only: `--seed 4` alone (this process) gives seed 4 of the two-seed run
    (two spawned processes); seeds run apart merge into the joint summary; settings that differ refuse to merge."""
    out, first = short_run
    assert main([*SHORT, "--seed", "4", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    before = [r for r in first["runs"] if r["seed"] == 4]
    fields = ("arm", "counts", "maze_entropy", "curve", "history")
    assert [[r.get(f) for f in fields] for r in again["runs"]] == [[r.get(f) for f in fields] for r in before]
    alone3 = tmp_path / "seed3only"
    alone3.mkdir()
    part = {**first, "runs": [r for r in first["runs"] if r["seed"] == 3], "test_sets": {"3": first["test_sets"]["3"]},
            "settings": {**first["settings"], "seeds": [3]}}
    (alone3 / "summary.json").write_text(json.dumps(part))
    merged = tmp_path / "merged"
    assert main(["sandbox", "--merge", str(alone3), str(tmp_path), "--resamples", "200", "--out", str(merged)]) == 0
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["runs"] == first["runs"] and summary["aggregate"] == first["aggregate"]
    assert summary["statistics"] == first["statistics"]
    assert (merged / "summary.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["sandbox", "--merge", str(tmp_path), str(tmp_path), "--out", str(merged)]) == 2
    assert "occur twice" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({**part, "settings": {**part["settings"], "rl_steps": 9}}))
    assert main(["sandbox", "--merge", str(other), str(tmp_path), "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "rl_steps (4 here, 9 in" in err


def test_settings_that_disagree_with_the_protocol_are_reported(short_run, tmp_path, capsys):
    out, first = short_run
    settings = {k: v for k, v in first["settings"].items() if k not in sandbox.NOT_SETTINGS}
    block = {"settings": {**settings, "rl_steps": 160}, "arms": ARMS, "tuning_seeds": [3, 4],
             "confirmation_seeds": [6], "primary": [{k: p[k] for k in ("a", "b", "metric", "alternative")}
                                                    for p in sandbox.PRIMARY]}
    protocol = tmp_path / "PROTOCOL.md"
    protocol.write_text("# frozen\n\n```json\n" + json.dumps(block) + "\n```\n")
    merged = tmp_path / "m"
    capsys.readouterr()
    assert main(["sandbox", "--merge", str(out), "--protocol", str(protocol), "--resamples", "200",
                 "--out", str(merged)]) == 0
    p = json.loads((merged / "summary.json").read_text())["protocol"]
    assert p["matches"] is False and p["differences"] == {"rl_steps": {"run": 4, "protocol": 160}}
    assert p["seeds"] == "tuning"
    assert "NOTE: these settings differ from" in capsys.readouterr().out
    protocol.write_text("# frozen\n\n```json\n" + json.dumps({**block, "settings": settings}) + "\n```\n")
    assert main(["sandbox", "--merge", str(out), "--protocol", str(protocol), "--resamples", "200",
                 "--out", str(merged)]) == 0
    assert json.loads((merged / "summary.json").read_text())["protocol"]["matches"] is True
    assert main(["sandbox", "--merge", str(out), "--protocol", str(tmp_path / "nope.md"), "--out", str(merged)]) == 2
    assert "--protocol" in capsys.readouterr().err


def resolved(*argv: str) -> argparse.Namespace:
    from openrlhf_passk.cli import build_parser

    args = build_parser(["sandbox"]).parse_args(["sandbox", *argv])
    return sandbox.resolve(args)


@pytest.mark.skipif(not (REPO / "docs/sandbox/PROTOCOL.md").is_file(), reason="no protocol file in this checkout")
def test_protocol_preset_is_the_frozen_protocol():
    """`--preset protocol` runs exactly the settings that docs/sandbox/PROTOCOL.md froze before the confirmation."""
    protocol = sandbox.load_protocol(REPO / "docs/sandbox/PROTOCOL.md")
    args = resolved("--preset", "protocol", "--seeds", *map(str, protocol["confirmation_seeds"]))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")}
    assert sandbox.check_protocol(settings, protocol)["differences"] == {}


def tiny_model(layers: int = 1, scale: float = 40.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # 40: a peaked distribution, so that temperature changes it a lot
        model.lm_head.weight.mul_(scale)
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


def test_finished_rows_leave_the_batch_without_changing_the_rest():
    """Rows that have ended drop out of the KV cache: every later token must still be scored by the full forward
    pass exactly as the sampler saw it, for answers of many different lengths."""
    model = tiny_model(layers=2, scale=3.0)  # flatter: eos (id 5) comes at many different positions
    torch.manual_seed(1)
    prompt = torch.randint(0, 5, (1, 4)).repeat(300, 1)
    tokens, mask, sampled_lp, entropy = sandbox.sample(model, prompt, 12, 1.0, torch.Generator().manual_seed(0), 0, 5)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) >= 5 and (lengths < tokens.shape[1]).any()
    assert (tokens[~mask] == 0).all()  # pad after the end
    logits = sandbox.response_logits(model, prompt, tokens, 1.0)
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(logp.gather(-1, tokens[..., None]).squeeze(-1)[mask], sampled_lp[mask], atol=1e-5)
    assert torch.allclose(-(logp.exp() * logp).sum(-1)[mask], entropy[mask], atol=1e-5)


def data_args(**kw) -> argparse.Namespace:
    base = {"sizes": [9], "loops": 0.3, "train_mazes": 2000, "test_mazes": 300, "test_layouts": 0.25,
            "prompts_per_step": 16, "holdout": "symmetry"}
    return argparse.Namespace(**{**base, **kw})


def images(layout: str) -> set[str]:
    """The 8 rotations and reflections of a layout, with numpy (independent of the code under test)."""
    grid = np.array([list(row) for row in layout.split("\n")])
    out = set()
    for g in (grid, grid.T):
        for turn in range(4):
            out.add("\n".join("".join(row) for row in np.rot90(g, turn)))
    return out


@pytest.mark.parametrize("size", [7, 9])
def test_held_out_layouts_are_no_rotation_or_reflection_of_a_training_layout(size):
    blank = str.maketrans({"S": ".", "E": "."})
    held_out = []
    want_test = 300 if size == 9 else 100
    for seed in (0, 1):
        train, test, clusters, notes = sandbox.make_data(data_args(sizes=[size], test_mazes=want_test), seed)
        assert len(train) == 2000 and len(test) == want_test and len(clusters) == want_test
        assert len({m.grid for m in train + test}) == 2000 + want_test
        train_layouts = {m.grid.translate(blank) for m in train}
        test_layouts = {m.grid.translate(blank) for m in test}
        assert not set().union(*(images(lay) for lay in test_layouts)) & train_layouts
        # Mazes of one cluster are symmetric images of each other; other clusters share no image.
        by_cluster: dict[int, set[str]] = {}
        for m, c in zip(test, clusters, strict=True):
            by_cluster.setdefault(c, set()).update(images(m.grid.translate(blank)))
        assert all(not a & b for a, b in itertools.combinations(by_cluster.values(), 2))
        if size == 9:  # room enough for one maze per class: 300 held-out mazes from 300 classes
            assert len(by_cluster) == 300 and notes[0]["test_classes_used"] == 300
        held_out.append(test_layouts)
    assert held_out[0] != held_out[1]  # each seed holds out other classes


def test_a_single_symmetry_class_is_a_clear_error(tmp_path, capsys):
    argv = ["sandbox", "--sizes", "5", "--train-mazes", "20", "--test-mazes", "5", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "5x5 mazes at --loops 0.3 have 4 wall layout(s) in a single symmetry class" in err
    assert "--holdout layout" in err


def test_asking_for_more_mazes_than_exist_is_a_clear_error(tmp_path, capsys):
    """5x5 at loops 0.3 has 4 wall layouts and 40 grids; one layout (10 grids) is held out, so 30 can train."""
    argv = ["sandbox", "--sizes", "5", "--holdout", "layout", "--train-mazes", "35", "--test-mazes", "5",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only 30 distinct 5x5 train mazes exist (3 of the 4 wall-layout classes" in err
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
    assert main(["sandbox", "--dim", "64", "--heads", "4", "--out", str(tmp_path)]) == 2
    assert "--dim 64 / --heads 4 gives head_dim 16; vLLM's CPU backend" in capsys.readouterr().err
    assert main(["sandbox", "--switch-at", "1.5", "--out", str(tmp_path)]) == 2
    assert "--switch-at 1.5 must be a fraction" in capsys.readouterr().err
    assert main(["sandbox", "--curve-n", "8", "--curve-k", "16", "--out", str(tmp_path)]) == 2
    assert "--curve-k 16 must be between 1 and --curve-n 8" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_presets_fill_only_the_flags_not_given():
    demo, protocol = resolved(), resolved("--preset", "protocol", "--rl-steps", "7")
    assert demo.rl_steps == sandbox.PRESETS["demo"]["rl_steps"] and demo.arms == sandbox.PRESETS["demo"]["arms"]
    assert protocol.rl_steps == 7 and protocol.eval_n == sandbox.PRESETS["protocol"]["eval_n"]
    assert protocol.arms == list(sandbox.ARMS)
