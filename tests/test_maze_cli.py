"""`openrlhf-passk maze generate`: files, dedup, determinism, errors, and OpenRLHF's own data loading."""

import json
import subprocess
import sys
import time

import pytest

from openrlhf_passk.cli import main
from openrlhf_passk.tasks.maze import generate, max_distinct, render_prompt, score, validate_grid


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def make(out, *extra):
    return main(
        [
            "maze",
            "generate",
            "--sizes",
            "7,9",
            "--train",
            "60",
            "--test",
            "25",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_generate_writes_valid_deduplicated_rows(tmp_path, capsys):
    assert make(tmp_path / "a") == 0
    train, test = read(tmp_path / "a" / "train.jsonl"), read(tmp_path / "a" / "test.jsonl")
    assert len(train) == 120 and len(test) == 50
    assert sorted(r["size"] for r in test) == [7] * 25 + [9] * 25
    grids = [r["label"] for r in train + test]
    assert len(set(grids)) == len(grids)  # within and across splits
    for row in train + test:
        assert set(row) == {"prompt", "label", "solution", "size", "length", "n_shortest", "seed", "loops"}
        validate_grid(row["label"])
        assert row["prompt"] == render_prompt(row["label"])
        assert score(f"<answer>{row['solution']}</answer>", row["label"]) == 1.0
        assert len(row["solution"]) == row["length"]
        assert generate(row["size"], row["seed"], row["loops"]).grid == row["label"]  # reproducible alone
    summary = capsys.readouterr().out
    assert "multi-route" in summary and "train" in summary and "wrote" in summary
    # Same seed, same files.
    assert make(tmp_path / "b") == 0
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_messages_format_with_loops(tmp_path):
    assert (
        make(
            tmp_path, "--format", "messages", "--system", "Be brief.", "--loops", "0.5", "--test-sizes", "11"
        )
        == 0
    )
    train, test = read(tmp_path / "train.jsonl"), read(tmp_path / "test.jsonl")
    assert {r["size"] for r in test} == {11}
    row = train[0]
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert row["prompt"][1] == {"role": "user", "content": render_prompt(row["label"])}
    assert any(r["n_shortest"] > 1 for r in train)


def test_rows_load_through_openrlhf_preprocessing(tmp_path):
    from openrlhf.datasets.prompts_dataset import preprocess_data

    assert make(tmp_path / "t") == 0 and make(tmp_path / "m", "--format", "messages") == 0
    text_row, msg_row = read(tmp_path / "t" / "train.jsonl")[0], read(tmp_path / "m" / "train.jsonl")[0]
    prompt, label = preprocess_data(text_row, input_key="prompt", label_key="label")
    assert prompt == text_row["prompt"] and label == text_row["label"]

    def template(chat, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in chat) + "<assistant>"

    for row in (text_row, msg_row):
        prompt, label = preprocess_data(
            row, input_key="prompt", label_key="label", apply_chat_template=template
        )
        assert prompt == f"<user>{render_prompt(label)}<assistant>"


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--sizes", "8"], 2, "odd integers"),
        (["--sizes", "9,x"], 2, "comma-separated"),
        (["--train", "-1"], 2, "non-negative"),
        (["--loops", "2"], 2, "[0, 1]"),
        (["--system", "hi"], 2, "--format messages"),
        (["--sizes", "5", "--train", "500", "--test", "0"], 2, "at most 48 distinct 5x5 mazes"),
        (["--sizes", "5", "--train", "30", "--test", "30"], 2, "--test 30 and --train 30 ask for 60"),
        # Under the bound (48) but over what the generator reaches (40): found out by trying, quickly.
        (["--sizes", "5", "--train", "45", "--test", "0"], 1, "only 40 distinct 5x5 train mazes"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(tmp_path, capsys, args, code, message):
    argv = ["maze", "generate", "--out", str(tmp_path), "--no-progress", *args]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == code
    assert message in capsys.readouterr().err


def test_console_entry_point(tmp_path, subprocess_env):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openrlhf_passk.cli",
            "maze",
            "generate",
            "--sizes",
            "9",
            "--train",
            "5",
            "--test",
            "2",
            "--out",
            str(tmp_path),
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert len(read(tmp_path / "train.jsonl")) == 5 and "100%" in out.stderr


def test_impossible_counts_fail_fast(tmp_path, capsys):
    t0 = time.monotonic()
    argv = ["maze", "generate", "--sizes", "5", "--train", "100000", "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    assert time.monotonic() - t0 < 5 and "at most 48 distinct 5x5 mazes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_max_distinct_bounds_what_the_generator_makes():
    # 5x5 has 2x2 cells: 4 spanning trees (a 4-cycle minus one passage). Per tree (a path of 4 cells)
    # S at an end has 2 far-enough E cells and S inside has 3: 4 * (2 + 3 + 3 + 2) = 40 grids, all
    # reached; the bound counts every (passage set, S, E): 4 * 4 * 3 = 48. With every wall open
    # (loops 1) there is one passage set, and every E is far enough: 4 * 3 = 12, exactly.
    perfect = {generate(5, seed).grid for seed in range(3000)}
    braided = {generate(5, seed, 1.0).grid for seed in range(3000)}
    assert len(perfect) == 40 and max_distinct(5) == 48
    assert len(braided) == 12 == max_distinct(5, 1.0)
    assert len({generate(7, seed).grid for seed in range(3000)}) <= max_distinct(7)


def test_non_empty_out_needs_force_and_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "data"
    assert make(out) == 0
    (out / "notes.txt").write_text("mine")
    before = {name: (out / name).read_bytes() for name in ("train.jsonl", "test.jsonl")}
    assert make(out, "--loops", "0.5") == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert make(out, "--loops", "0.5", "--force") == 0
    assert read(out / "train.jsonl")[0]["loops"] == 0.5 and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "test.jsonl", "train.jsonl"]


def test_a_failed_write_replaces_neither_file(tmp_path, capsys, monkeypatch):
    import tempfile

    out = tmp_path / "data"
    assert make(out) == 0
    before = {name: (out / name).read_bytes() for name in ("train.jsonl", "test.jsonl")}
    real_mkstemp, calls = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):  # the second file cannot be created (disk full, say)
        calls.append(kwargs.get("prefix"))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert make(out, "--loops", "0.5", "--force") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temporary left
