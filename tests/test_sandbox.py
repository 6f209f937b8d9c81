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
    protocol_file = REPO / "docs/sandbox/PROTOCOL.md"
    if protocol_file.is_file():  # the run found it by default: every frozen setting the 5x5 toy changes is listed
        text = protocol_file.read_text()
        frozen = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])["settings"]
        want = {key: {"run": summary["settings"][key], "protocol": value} for key, value in frozen.items()
                if summary["settings"][key] != value}
        assert {"sizes", "holdout", "rl_steps", "test_mazes", "eval_n"} <= set(want)
        assert summary["protocol"]["matches"] is False and summary["protocol"]["differences"] == want
        assert summary["protocol"]["seeds"].startswith("other")  # 3 and 4: neither tuning nor confirmation seeds
    assert (out / "report.md").read_text() == sandbox.render_report(summary)


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
        # 2 seeds x 6 mazes: all 4,096 sign patterns of the per-maze differences, weighted so that their sum is the
        # mean over seeds of the per-seed means; two-sided p = the share at least as far from 0 as the observed.
        d = np.array([(brute_force(4, ca, 4) - brute_force(4, cb, 4)) / (2 * 6) for s in (3, 4) for (_, ca), (_, cb)
                      in zip(runs[(c["a"], s)]["counts"], runs[(c["b"], s)]["counts"], strict=True)])
        signs = np.array(list(itertools.product((1, -1), repeat=len(d))))
        assert c["permutation_p"] == pytest.approx(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9))
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
    # CPU mode rolls these checkpoints out through OpenRLHF, whose default --data.max_len (prompt + answer) is
    # 2,048 tokens: fewer positions would fail there, not here.
    assert config.max_position_embeddings >= 2048
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
    assert main(["sandbox", "--merge", str(alone3), str(tmp_path), "--resamples", "50", "--out", str(merged)]) == 2
    assert "--resamples 50: use at least 100" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({**part, "settings": {**part["settings"], "rl_steps": 9}}))
    assert main(["sandbox", "--merge", str(other), str(tmp_path), "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "rl_steps (4 here, 9 in" in err


def test_merge_refuses_runs_from_another_kind_of_device_and_redoes_the_resampling(short_run, tmp_path, capsys):
    """CPU and GPU runs of the same settings give different numbers, so they never merge (cuda:0 and cuda are one
    kind); the parts' bootstrap and permutation resamples do not matter, since the merge recomputes them."""
    _, first = short_run

    def part(name: str, seed: int, device: str = "cpu", resamples: int = 200) -> Path:
        d = tmp_path / name
        d.mkdir()
        summary = {**first, "runs": [r for r in first["runs"] if r["seed"] == seed],
                   "test_sets": {str(seed): first["test_sets"][str(seed)]},
                   "settings": {**first["settings"], "seeds": [seed], "device": device, "resamples": resamples},
                   "statistics": {**first["statistics"], "resamples": resamples}}
        (d / "summary.json").write_text(json.dumps(summary))
        return d

    cpu3, gpu4 = part("cpu3", 3, device="cpu"), part("gpu4", 4, device="cuda")
    merged = tmp_path / "merged"
    capsys.readouterr()
    assert main(["sandbox", "--merge", str(cpu3), str(gpu4), "--resamples", "200", "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert f"--merge {gpu4}: settings differ from {cpu3} in device ('cuda' here, 'cpu' in {cpu3})" in err
    assert not merged.exists()
    gpu3 = part("gpu3", 3, device="cuda:0")
    assert main(["sandbox", "--merge", str(gpu3), str(gpu4), "--resamples", "200", "--out", str(merged)]) == 0

    fine3, coarse4 = part("fine3", 3, resamples=500), part("coarse4", 4, resamples=200)
    out = tmp_path / "resampled"
    capsys.readouterr()
    assert main(["sandbox", "--merge", str(fine3), str(coarse4), "--resamples", "300", "--out", str(out)]) == 0
    assert ("the parts' statistics used --resamples 200, 500; the merged statistics are recomputed with "
            "--resamples 300") in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["resamples"] == 300 and summary["statistics"]["resamples"] == 300
    assert summary["runs"] == first["runs"] and (out / "report.md").is_file()
    assert main(["sandbox", "--merge", str(fine3), "--resamples", "5", "--out", str(out)]) == 2
    assert "--resamples 5: use at least 100" in capsys.readouterr().err


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
    # That protocol names the device (cpu): a GPU run of the same settings differs from it; one that names no
    # device leaves it open.
    assert settings["device"] == "cpu"
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "summary.json").write_text(json.dumps({**first, "settings": {**first["settings"], "device": "cuda"}}))
    assert main(["sandbox", "--merge", str(gpu), "--protocol", str(protocol), "--resamples", "200",
                 "--out", str(merged)]) == 0
    p = json.loads((merged / "summary.json").read_text())["protocol"]
    assert p["matches"] is False and p["differences"] == {"device": {"run": "cuda", "protocol": "cpu"}}
    open_device = {k: v for k, v in settings.items() if k != "device"}
    protocol.write_text("# frozen\n\n```json\n" + json.dumps({**block, "settings": open_device}) + "\n```\n")
    assert main(["sandbox", "--merge", str(gpu), "--protocol", str(protocol), "--resamples", "200",
                 "--out", str(merged)]) == 0
    assert json.loads((merged / "summary.json").read_text())["protocol"]["matches"] is True
    capsys.readouterr()
    assert main(["sandbox", "--merge", str(out), "--protocol", str(tmp_path / "nope.md"), "--out", str(merged)]) == 2
    assert "--protocol" in capsys.readouterr().err


def small_summary() -> dict:
    """A summary.json by hand: 2 seeds, 3 arms, 4 metrics, one contrast of each kind, with round numbers whose
    printed form (3 decimals, signed for differences) is easy to write down."""
    def run(seed: int, arm: str, p1: float, p2: float, entropy: float, distinct: float) -> dict:
        return {"seed": seed, "arm": arm, "counts": [[4, 1], [4, 0], [4, 2]], "pass_at_k": {"1": p1, "2": p2},
                "entropy": entropy, "distinct_per_solved": distinct}

    def agg(mean: float, sd: float) -> dict:
        return {"mean": mean, "sd": sd, "se": sd / math.sqrt(2), "n_seeds": 2}

    def contrast(a, b, metric, per_seed, mean, t, boot, p, excludes, mde) -> dict:
        return {"a": a, "b": b, "metric": metric, "alternative": "two-sided", "per_seed": per_seed, "mean": mean,
                "seed_sd": 0.01, "t_interval": t, "bootstrap_interval": boot, "bootstrap_sd": 0.01,
                "permutation_p": p, "n_mazes": 6, "mde": mde, "intervals_exclude_0": excludes}

    metrics = ("pass@1", "pass@2", "entropy", "distinct_per_solved")
    return {
        "runs": [run(1, "sft", 0.1111, 0.2222, 0.5004, 1.25), run(2, "sft", 0.1333, 0.2667, 0.4996, 1.75),
                 run(1, "grpo", 0.2011, 0.3022, 0.3101, 1.1), run(2, "grpo", 0.2212, 0.3138, 0.2899, 1.3),
                 run(1, "passk", 0.1907, 0.3334, 0.4102, 1.5), run(2, "passk", 0.2016, 0.3426, 0.3898, 1.7)],
        "test_sets": {},
        "settings": {"device": "cpu", "rl_steps": 4, "k": 2, "switch_at": 0.5, "eval_n": 2},
        "protocol": {"file": "P.md", "matches": False, "seeds": "tuning",
                     "differences": {"rl_steps": {"run": 4, "protocol": 160}}},
        "aggregate": {"sft": dict(zip(metrics, (agg(0.1222, 0.0157), agg(0.2444, 0.0314), agg(0.5, 0.0006),
                                                agg(1.5, 0.3536)), strict=True)),
                      "grpo": dict(zip(metrics, (agg(0.2112, 0.0142), agg(0.308, 0.0082), agg(0.3, 0.0143),
                                                 agg(1.2, 0.1414)), strict=True)),
                      "passk": dict(zip(metrics, (agg(0.1962, 0.0077), agg(0.338, 0.0065), agg(0.4, 0.0144),
                                                  agg(1.6, 0.1414)), strict=True))},
        "statistics": {
            "alpha": 0.05, "resamples": 1000,
            "primary": [
                {**contrast("passk", "grpo", "pass@2", {"1": 0.0312, "2": 0.0288}, 0.0300, [0.0148, 0.0452],
                            [0.0201, 0.0399], 0.00099900, True, 0.0112), "holm_p": 0.0019980, "verdict": "reproduced"},
                {"a": "passk", "b": "grpo", "metric": "pass@16", "alternative": "two-sided", "missing": True,
                 "verdict": "not run (an arm or the metric is missing)"}],
            "secondary": [
                contrast("passk", "grpo", "pass@1", {"1": -0.0104, "2": -0.0196}, -0.0150, [-0.0734, 0.0434],
                         [-0.0251, -0.0049], 0.0468, False, 0.0617),
                contrast("passk", "sft", "entropy", {"1": -0.0902, "2": -0.1098}, -0.1000, [-0.2244, 0.0244],
                         [-0.1151, -0.0849], 0.00099900, False, 0.1283),
                contrast("grpo", "sft", "pass@1", {"1": 0.0900, "2": 0.0879}, 0.0889, [0.0756, 0.1023],
                         [0.0851, 0.0927], 0.2468, True, 0.0079)],
            "passk_minus_grpo_by_k": {"1": -0.0150, "2": 0.0300},
            "equal_footing": {"flag": ["passk"], "per_arm": {
                "grpo": {"start": 0.4031, "end": 0.3399, "zero_adv_groups_start": 0.5120,
                         "zero_adv_groups_end": 0.5880, "steps_averaged": 1,
                         "ratio_to_grpo": {"start": 1.0, "end": 1.0}},
                "passk": {"start": 0.1109, "end": 0.0951, "zero_adv_groups_start": 0.5230,
                          "zero_adv_groups_end": 0.5710, "steps_averaged": 1,
                          "ratio_to_grpo": {"start": 0.2751, "end": 0.2798}}}}},
        "timing": {"wall_s": 12.3, "cpu_s": 20.4, "loadavg_start": [0.5, 0.4, 0.3], "loadavg_end": [1.5, 1.0, 0.7],
                   "jobs": 2, "threads": 1},
    }


def table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]


def test_report_shows_every_arm_contrast_and_the_update_size_check():
    report = sandbox.render_report(small_summary())
    rows = table_rows(report)
    # Every arm: mean +- sd over seeds, and each seed's own values, for every metric.
    assert ["`grpo`", "0.211 +- 0.014", "0.308 +- 0.008", "0.300 +- 0.014", "1.200 +- 0.141"] in rows
    assert ["`passk`", "2", "0.202", "0.343", "0.390", "1.700"] in rows
    assert ["`sft`", "1", "0.111", "0.222", "0.500", "1.250"] in rows
    # Primary: estimate, per seed, t, bootstrap, permutation p, Holm p, verdict; a missing endpoint says so.
    assert ["`passk` - `grpo`, pass@2 (two-sided)", "+0.030", "1: +0.031, 2: +0.029", "[+0.015, +0.045]",
            "[+0.020, +0.040]", "0.001", "0.0020", "reproduced"] in rows
    assert ["`passk` - `grpo`, pass@16 (two-sided)", "-", "-", "-", "-", "-", "-",
            "not run (an arm or the metric is missing)"] in rows
    # Secondary, the wrong-way one included; "not detected" comes with the smallest detectable effect.
    secondary = [row for row in rows if len(row) == 8 and row[1] in ("pass@1", "entropy")]
    assert secondary == [
        ["`passk` - `grpo`", "pass@1", "-0.015", "1: -0.010, 2: -0.020", "[-0.073, +0.043]", "[-0.025, -0.005]",
         "0.0468", "not detected (smallest detectable effect 0.062)"],
        ["`passk` - `sft`", "entropy", "-0.100", "1: -0.090, 2: -0.110", "[-0.224, +0.024]", "[-0.115, -0.085]",
         "0.001", "not detected (smallest detectable effect 0.128)"],
        ["`grpo` - `sft`", "pass@1", "+0.089", "1: +0.090, 2: +0.088", "[+0.076, +0.102]", "[+0.085, +0.093]",
         "0.2468", "both intervals exclude 0"]]
    assert ["1", "-0.015"] in rows and ["2", "+0.030"] in rows  # passk - grpo at every k
    # Update sizes: start, end, both ratios to grpo, zero-advantage groups; the flagged arm is named.
    assert ["`passk`", "0.111", "0.095", "0.28", "0.28", "0.52", "0.57"] in rows
    assert "more than a factor of 2** (a ratio outside [1/2, 2]) for `passk`." in report
    assert "rl_steps (run 4, protocol 160)" in report
    assert "12.3 s wall, 20.4 CPU s" in report


def test_report_flag_writes_report_md_from_the_summary_alone(tmp_path, capsys):
    """--report reads DIR/summary.json and writes DIR/report.md; summary.json stays byte for byte; unreadable or
    older summaries are clear errors."""
    done, empty, broken, old = (tmp_path / name for name in ("done", "empty", "broken", "old"))
    for d in (done, empty, broken, old):
        d.mkdir()
    text = json.dumps(small_summary(), indent=1) + "\n"
    (done / "summary.json").write_text(text)
    (broken / "summary.json").write_text("{")
    (old / "summary.json").write_text(json.dumps({"runs": [], "settings": {}}))
    assert main(["sandbox", "--report", str(done)]) == 0
    assert (done / "summary.json").read_text() == text
    assert "| `grpo` - `sft` | pass@1 | +0.089 |" in (done / "report.md").read_text()
    assert sorted(p.name for p in done.iterdir()) == ["report.md", "summary.json"]  # nothing trained or plotted
    capsys.readouterr()
    assert main(["sandbox", "--report", str(empty)]) == 2
    assert f"--report {empty}: no summary.json there" in capsys.readouterr().err
    assert main(["sandbox", "--report", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["sandbox", "--report", str(old)]) == 2
    assert ("written by an older sandbox (it has no test_sets, protocol, aggregate, statistics, timing); rerun it"
            in capsys.readouterr().err)


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
