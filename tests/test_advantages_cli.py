"""`openrlhf-passk advantages`: listing, computing, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from openrlhf_passk import advantages
from openrlhf_passk.cli import main


def test_lists_every_estimator_with_params_and_summary(capsys) -> None:
    assert main(["advantages"]) == 0
    out = capsys.readouterr().out
    for name in advantages.available():
        assert name in out
    assert "(k, num_groups=None, seed=None, reduce='mean')" in out
    assert "(k, baseline='loo-1')" in out
    assert main(["advantages", "--name", "pkpo", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "pkpo" and row["doc"].startswith("PKPO")


def test_computes_advantages_for_given_rewards(capsys) -> None:
    assert main(["advantages", "--name", "passk", "--k", "2", "--rewards", "1,0,0,1;1,1,1,0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # Binary N=4, k=2, two correct: Rbar = 1 - 1/6 = 5/6, sigma = sqrt(5)/6, A_pos = 1/sqrt(5) = -A_neg.
    assert data["advantages"][0] == pytest.approx([5**-0.5, -(5**-0.5), -(5**-0.5), 5**-0.5])
    assert data["advantages"][1] == [0.0] * 4  # one wrong < k: every 2-subset has a correct answer
    args = ["advantages", "--name", "pkpo", "--k", "2", "--rewards", "1,0,0,1", "--param", "baseline=none"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0.5000" in out and "0.3333" in out  # k/N = 1/2 correct; (k/N) rho(3, 2, 1) = 1/2 * 2/3 wrong


def test_adaptive_takes_one_entropy_per_group(capsys) -> None:
    argv = ["advantages", "--name", "passk_adaptive", "--k", "2", "--rewards", "1,0,0,1;1,0,0,0"]
    assert main([*argv, "--entropy", "0.4,1.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # G = 2, split 0.5: the higher-entropy group (the second) gets grpo, the first passk (+-1/sqrt(5)).
    assert data["advantages"][0] == pytest.approx([5**-0.5, -(5**-0.5), -(5**-0.5), 5**-0.5])
    grpo = advantages.compute("grpo", torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert data["advantages"][1] == pytest.approx(grpo[0].tolist())
    assert data["params"] == {"k": 2, "entropy": [0.4, 1.3]}
    assert main([*argv]) == 2
    assert "needs parameter(s): entropy" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", "passk", "--k", "5", "--rewards", "1,0,0,1"], "k=5 with N=4"),
        (["--name", "nope"], "unknown advantage estimator 'nope'"),
        (["--name", "passk", "--k", "2", "--rewards", "1,x"], "--rewards must be comma-separated numbers"),
        (["--name", "passk", "--k", "2", "--rewards", "1,0;1"], "same number of rollouts"),
        (["--name", "passk", "--k", "1", "--rewards", "1,0", "--param", "oops"], "KEY=VALUE"),
        (["--name", "passk", "--k", "1", "--rewards", "1,0", "--param", "m=2"], "unknown parameter(s) m"),
        (["--rewards", "1,0"], "--rewards needs --name"),
        (["--k", "2"], "--k, --param and --entropy need --rewards"),
        (["--name", "passk_adaptive", "--k", "1", "--rewards", "1,0;0,1", "--entropy", "1"], "one number per group"),
        (["--name", "passk_adaptive", "--k", "1", "--rewards", "1,0", "--entropy", "a"], "--entropy must be"),
        (["--name", "passk_combination", "--k", "1", "--rewards", "1,0.5"], "must be binary"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys) -> None:
    assert main(["advantages", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_console_entry_point_exit_code(subprocess_env) -> None:
    bad = [
        sys.executable,
        "-m",
        "openrlhf_passk",
        "advantages",
        "--name",
        "passk",
        "--k",
        "0",
        "--rewards",
        "1,0",
    ]
    proc = subprocess.run(bad, capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2 and "k=0 with N=2" in proc.stderr and "Traceback" not in proc.stderr
