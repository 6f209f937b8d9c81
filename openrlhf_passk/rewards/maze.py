"""Maze reward for OpenRLHF: `--remote_rm_url /path/to/openrlhf_passk/rewards/maze.py`.

OpenRLHF loads this file with `importlib.util.spec_from_file_location` (not as part of the package), so
it uses absolute imports only. It calls `reward_func(queries, prompts, labels)` once per sample, in a
thread, with the decoded prompt + response (chat-template tokens included), the raw prompt and the
label (the maze grid). Scoring mode: env `OPENRLHF_PASSK_MAZE_MODE` = strict (default) | reference;
largest label grid: env `OPENRLHF_PASSK_MAZE_MAX_GRID` (default 101, rows and columns).

OpenRLHF logs any exception from here at INFO level and swallows it, so a bad label (malformed,
too large or unsolvable) is logged at ERROR level before the ValueError is raised; labels should be
checked when the data is made (the generator only writes valid, solvable grids).
"""

from __future__ import annotations

import logging
import os
import re

from openrlhf_passk import env
from openrlhf_passk.tasks.maze import MODES, Grid, parse_answer, parse_grid, score_parsed

logger = logging.getLogger("openrlhf_passk.rewards.maze")

MODE = os.environ.get(env.MAZE_MODE, "strict")
if MODE not in MODES:
    raise ValueError(f"{env.MAZE_MODE} must be one of {MODES}, got {MODE!r}")
# Largest label grid (rows and columns) scored: bounds the work one label can cost. Our generator
# makes up to 41x41.
_MAX_GRID_ENV = os.environ.get(env.MAZE_MAX_GRID, "101")
if not _MAX_GRID_ENV.isdigit() or int(_MAX_GRID_ENV) < 2:
    raise ValueError(f"{env.MAZE_MAX_GRID} must be an integer >= 2, got {_MAX_GRID_ENV!r}")
MAX_GRID = int(_MAX_GRID_ENV)
_LIMIT_FLAGS = f"serve-reward --max-grid, or env {env.MAZE_MAX_GRID} for the reward file"

# Where common chat templates hand over to the assistant; the response follows the last one.
ASSISTANT_MARKERS = (
    "<|im_start|>assistant",  # ChatML (Qwen)
    "<|start_header_id|>assistant<|end_header_id|>",  # Llama 3
    "<|assistant|>",  # Phi, Zephyr
    "<\uff5cAssistant\uff5c>",  # DeepSeek
    "<start_of_turn>model",  # Gemma
    "[/INST]",  # Mistral, Llama 2
)
# End-of-turn tokens that follow the response when decoded with special tokens. Stripped because the
# reference mode walks every letter outside <answer> tags ("<|im_end|>" holds a D).
END_MARKERS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)


# Reversed, so a forward match from the start finds the whole trailer; no marker is a suffix of another.
# Possessive (*+): nothing follows the group, so there is never anything to backtrack to, and a plain * made
# the regex engine keep backtracking state for every repetition (about 150 bytes per character of trailer).
_TRAILER = re.compile("(?:\\s|" + "|".join(re.escape(m[::-1]) for m in END_MARKERS) + ")*+")


def _last(haystack: str, needle: str) -> int:
    """`haystack.rfind(needle)` in linear time. CPython's rfind can take quadratic time on long,
    repetitive needles (its linear two-way search only runs forwards), and both strings come from the
    client, so search the reversed strings forwards instead."""
    at = haystack[::-1].find(needle[::-1])
    return -1 if at < 0 else len(haystack) - at - len(needle)


def extract_response(query: str, prompt: str, grid: str) -> str:
    """The model's response inside `query` (prompt + response as OpenRLHF decodes it), without
    trailing end-of-turn tokens. Linear time in the sizes of its inputs.

    The prompt itself shows an example <answer>, so it must never be scored: cut after the prompt when
    the query contains it, else after the last assistant marker, else after the maze grid (our prompt
    ends with it). Only a query with none of these is scored whole.
    """
    at = query.find(prompt) if prompt else -1
    if at >= 0:
        begin = at + len(prompt)
    else:
        markers = [_last(query, m) + len(m) for m in ASSISTANT_MARKERS if m in query]
        body = grid.strip()
        if markers:
            begin = max(markers)
        elif body and body in query:
            begin = _last(query, body) + len(body)
        else:
            begin = 0
    # Trailing whitespace and end markers, matched once on the reversed response: stripping one marker
    # at a time re-sliced the whole response each time (quadratic on "</s>" * 100000).
    response = query[begin:]
    return response[: len(response) - _TRAILER.match(response[::-1]).end()]


def check_label(i: int, label: str, max_grid: int = MAX_GRID) -> Grid:
    """labels[i] parsed; ValueError naming it when it is malformed, over `max_grid` x `max_grid`, or
    has no route from S to E (a silent 0 for every response would hide the bad label)."""
    if len(label) > max_grid * (max_grid + 1) + 1024:  # cheap, before any parsing
        raise ValueError(
            f"labels[{i}] has {len(label)} characters, more than a {max_grid}x{max_grid} grid can hold "
            f"(the grid size limit: {_LIMIT_FLAGS})"
        )
    try:
        grid = parse_grid(label)
    except ValueError as e:
        raise ValueError(f"labels[{i}] is not a maze grid: {e}") from None
    height, width = len(grid.rows), len(grid.rows[0])
    if height > max_grid or width > max_grid:
        raise ValueError(
            f"labels[{i}] is a {height}x{width} grid, over the grid size limit of {max_grid}x{max_grid} "
            f"({_LIMIT_FLAGS})"
        )
    if not grid.solvable:
        raise ValueError(
            f"labels[{i}] is not a solvable maze: 'E' cannot be reached from 'S', so every response would "
            "score 0 (fix the data; `openrlhf-passk maze generate` writes only solvable grids)"
        )
    return grid


def score_batch(
    queries: list[str],
    prompts: list[str] | None,
    labels: list[str],
    mode: str = MODE,
    max_grid: int = MAX_GRID,
) -> tuple[list[float], dict[str, list[float]]]:
    """Rewards (under `mode`) and per-sample logs for a batch; ValueError naming the field on bad input.

    Logs: maze_format_ok (strict mode found a clean <answer> path), maze_strict and maze_reference
    (the reward under each mode, so the gap the public verifier's loopholes open is visible).
    Every label is checked (see `check_label`) before any response is scored, and parsed once.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, values in (("query", queries), ("labels", labels), ("prompts", prompts)):
        if name == "prompts" and values is None:
            continue
        if not isinstance(values, list):
            raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ValueError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    if prompts is None:
        prompts = [""] * len(queries)
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(
            "query, prompts and labels must have the same length, "
            f"got {len(queries)}, {len(prompts)}, {len(labels)}"
        )
    grids = [check_label(i, label, max_grid) for i, label in enumerate(labels)]
    logs: dict[str, list[float]] = {"maze_format_ok": [], "maze_strict": [], "maze_reference": []}
    for query, prompt, label, grid in zip(queries, prompts, labels, grids, strict=True):
        response = extract_response(query, prompt, label)
        logs["maze_format_ok"].append(float(parse_answer(response) is not None))
        logs["maze_strict"].append(score_parsed(response, grid, "strict"))
        logs["maze_reference"].append(score_parsed(response, grid, "reference"))
    return list(logs[f"maze_{mode}"]), logs


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **kwargs) -> dict:
    """OpenRLHF's entry point: {"rewards": tensor, "scores": tensor, "extra_logs": {name: tensor}}."""
    import torch

    try:
        rewards, logs = score_batch(queries, prompts, labels)
    except ValueError as e:
        # OpenRLHF only logs this at INFO and continues with a missing reward: make it loud here.
        logger.error("maze reward_func rejected its input: %s", e)
        raise
    return {
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "scores": torch.tensor(rewards, dtype=torch.float32),
        "extra_logs": {k: torch.tensor(v, dtype=torch.float32) for k, v in logs.items()},
    }
