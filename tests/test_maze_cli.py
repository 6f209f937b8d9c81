"""`openrlhf-passk maze generate`: files, dedup, determinism, errors, and OpenRLHF's own data loading."""

import json
import subprocess
import sys

import pytest

from openrlhf_passk.cli import main
from openrlhf_passk.tasks.maze import generate, render_prompt, score, validate_grid


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
        (["--sizes", "5", "--train", "500", "--test", "0"], 1, "distinct 5x5 train mazes"),
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
