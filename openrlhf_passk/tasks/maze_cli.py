"""`openrlhf-passk maze generate`: deduplicated maze train/test JSONL files for OpenRLHF.

Each row: {"prompt", "label" (the grid), "solution", "size", "length", "n_shortest", "seed", "loops"};
train with `--prompt_data DIR/train.jsonl --input_key prompt --label_key label`. With
`--format messages` the prompt is a chat-message list (for `--apply_chat_template`). Every row is
reproducible alone: `generate(row["size"], row["seed"], row["loops"])`. A non-empty --out needs
--force; both files are replaced together or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path


def _sizes(text: str) -> list[int]:
    from openrlhf_passk.tasks.maze import MAX_SIZE, MIN_SIZE

    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 9,11,13,15, got {text!r}"
        ) from None
    bad = [s for s in sizes if s % 2 == 0 or not MIN_SIZE <= s <= MAX_SIZE]
    if not sizes or bad:
        raise argparse.ArgumentTypeError(
            f"sizes must be odd integers from {MIN_SIZE} to {MAX_SIZE}, got {text!r}"
        )
    return sizes


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=_sizes, default=[9, 11, 13, 15], help="train sizes (default 9,11,13,15)"
    )
    parser.add_argument("--test-sizes", type=_sizes, default=None, help="test sizes (default: --sizes)")
    parser.add_argument("--train", type=_count, default=10000, help="train mazes PER SIZE (default 10000)")
    parser.add_argument("--test", type=_count, default=100, help="test mazes PER SIZE (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument(
        "--loops",
        type=_fraction,
        default=0.0,
        help="fraction of removable walls knocked out, 0..1 (default 0)",
    )
    parser.add_argument(
        "--format", choices=("text", "messages"), default="text", help="prompt as text or chat messages"
    )
    parser.add_argument("--system", default=None, help="optional system message (with --format messages)")
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder for train.jsonl and test.jsonl"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace train.jsonl and test.jsonl in a non-empty --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import random

    from tqdm import tqdm

    from openrlhf_passk.tasks.maze import generate, max_distinct, render_messages, render_prompt

    if args.system and args.format != "messages":
        print("error: --system needs --format messages", file=sys.stderr)
        return 2
    test_sizes = args.test_sizes or args.sizes
    plan = [("test", s, args.test) for s in test_sizes] + [("train", s, args.train) for s in args.sizes]
    # Up front, so an impossible request fails in milliseconds instead of after minutes of attempts.
    for size in dict.fromkeys(test_sizes + args.sizes):
        wanted = sum(n for _, s, n in plan if s == size)
        bound = max_distinct(size, args.loops)
        if wanted > bound:
            asks = " and ".join(f"--{split} {n}" for split, s, n in plan if s == size and n)
            print(
                f"error: at most {bound} distinct {size}x{size} mazes exist (with --loops {args.loops:g}), but "
                f"{asks} ask for {wanted} of that size; lower the counts or use larger --sizes/--test-sizes",
                file=sys.stderr,
            )
            return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file; pass a folder", file=sys.stderr)
        return 2
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        print(
            f"error: --out {args.out} is not empty; pass --force to replace train.jsonl and test.jsonl there "
            "(other files are left alone), or choose a new folder",
            file=sys.stderr,
        )
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --out {args.out}: {e}", file=sys.stderr)
        return 1

    # Test first, so that train mazes are deduplicated against test ones (and within themselves).
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {"test": [], "train": []}
    bar = tqdm(total=sum(n for *_, n in plan), unit="maze", disable=args.no_progress)
    for split, size, wanted in plan:
        # One seed stream per (split, size): adding a size or changing a count leaves the others intact.
        rng = random.Random(f"openrlhf-passk-dataset/{args.seed}/{split}/{size}")
        made, attempts = 0, 0
        while made < wanted:
            attempts += 1
            if attempts > 20 * wanted + 1000:
                bar.close()
                print(
                    f"error: only {made} distinct {size}x{size} {split} mazes after {attempts - 1} attempts "
                    f"(small sizes have few distinct mazes); lower --{split} or use a larger size",
                    file=sys.stderr,
                )
                return 1
            seed = rng.getrandbits(63)
            maze = generate(size, seed, args.loops)
            if maze.grid in seen:
                continue
            seen.add(maze.grid)
            prompt = (
                render_messages(maze.grid, args.system)
                if args.format == "messages"
                else render_prompt(maze.grid)
            )
            rows[split].append(
                {
                    "prompt": prompt,
                    "label": maze.grid,
                    "solution": maze.solution,
                    "size": size,
                    "length": maze.length,
                    "n_shortest": maze.n_shortest,
                    "seed": seed,
                    "loops": args.loops,
                }
            )
            made += 1
            bar.update()
    bar.close()

    # Both files or neither: write temporary files next to the targets, then rename them (atomic on one
    # file system), so a failed write never leaves a new train.jsonl beside an old test.jsonl.
    temps: dict[str, str] = {}
    try:
        for split, items in rows.items():
            fd, temps[split] = tempfile.mkstemp(dir=args.out, prefix=f".{split}.jsonl.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in items)
        for split, temp in temps.items():
            os.replace(temp, args.out / f"{split}.jsonl")
    except OSError as e:
        for temp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(temp)
        print(f"error: cannot write train.jsonl and test.jsonl in {args.out}: {e}", file=sys.stderr)
        return 1

    print(f"{'split':<6} {'size':>4} {'count':>6} {'len mean':>8} {'min':>4} {'max':>4} {'multi-route':>11}")
    for split, size, _ in plan:
        items = [row for row in rows[split] if row["size"] == size]
        if not items:
            continue
        lengths = [row["length"] for row in items]
        multi = sum(row["n_shortest"] > 1 for row in items) / len(items)
        print(
            f"{split:<6} {size:>4} {len(items):>6} {sum(lengths) / len(lengths):>8.1f} "
            f"{min(lengths):>4} {max(lengths):>4} {multi:>11.1%}"
        )
    print(
        f"wrote {args.out / 'train.jsonl'} ({len(rows['train'])} rows), {args.out / 'test.jsonl'} "
        f"({len(rows['test'])} rows)"
    )
    return 0
