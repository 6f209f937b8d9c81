"""Maze reward for OpenRLHF: `--remote_rm_url /path/to/openrlhf_passk/rewards/maze.py`.

OpenRLHF loads this file with `importlib.util.spec_from_file_location` (not as part of the package), so
it uses absolute imports only. It calls `reward_func(queries, prompts, labels)` once per sample, in a
thread, with the decoded prompt + response (chat-template tokens included), the raw prompt and the
label (the maze grid). Scoring mode: env `OPENRLHF_PASSK_MAZE_MODE` = strict (default) | reference.

OpenRLHF logs any exception from here at INFO level and swallows it, so a bad label is logged at ERROR
level before the ValueError is raised; labels should be checked when the data is made (the generator
only writes valid grids).
"""

from __future__ import annotations

import logging
import os

from openrlhf_passk.tasks.maze import MODES, parse_answer, score, validate_grid

logger = logging.getLogger("openrlhf_passk.rewards.maze")

MODE = os.environ.get("OPENRLHF_PASSK_MAZE_MODE", "strict")
if MODE not in MODES:
    raise ValueError(f"OPENRLHF_PASSK_MAZE_MODE must be one of {MODES}, got {MODE!r}")

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


def extract_response(query: str, prompt: str, grid: str) -> str:
    """The model's response inside `query` (prompt + response as OpenRLHF decodes it), without
    trailing end-of-turn tokens.

    The prompt itself shows an example <answer>, so it must never be scored: cut after the prompt when
    the query contains it, else after the last assistant marker, else after the maze grid (our prompt
    ends with it). Only a query with none of these is scored whole.
    """
    at = query.find(prompt) if prompt else -1
    markers = [query.rfind(m) + len(m) for m in ASSISTANT_MARKERS if m in query]
    body = grid.strip()
    if at >= 0:
        response = query[at + len(prompt) :]
    elif markers:
        response = query[max(markers) :]
    elif body and body in query:
        response = query[query.rfind(body) + len(body) :]
    else:
        response = query
    response = response.rstrip()
    stripped = True
    while stripped:
        stripped = False
        for m in END_MARKERS:
            if response.endswith(m):
                response, stripped = response[: -len(m)].rstrip(), True
    return response


def score_batch(
    queries: list[str], prompts: list[str] | None, labels: list[str], mode: str = MODE
) -> tuple[list[float], dict[str, list[float]]]:
    """Rewards (under `mode`) and per-sample logs for a batch; ValueError naming the field on bad input.

    Logs: maze_format_ok (strict mode found a clean <answer> path), maze_strict and maze_reference
    (the reward under each mode, so the gap the public verifier's loopholes open is visible).
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
    for i, label in enumerate(labels):
        try:
            validate_grid(label)
        except ValueError as e:
            raise ValueError(f"labels[{i}] is not a maze grid: {e}") from None
    logs: dict[str, list[float]] = {"maze_format_ok": [], "maze_strict": [], "maze_reference": []}
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        response = extract_response(query, prompt, label)
        logs["maze_format_ok"].append(float(parse_answer(response) is not None))
        logs["maze_strict"].append(score(response, label, "strict"))
        logs["maze_reference"].append(score(response, label, "reference"))
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
