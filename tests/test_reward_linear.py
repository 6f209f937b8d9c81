"""Scoring costs linear time in the input (a search or a strip loop that is quadratic makes a cheap request
hold a worker for seconds), and label work is bounded:
4x the input must cost under 6x the time, for hostile shapes that hypothesis builds from the strings the
scorer searches for. Timings are the minimum of several runs at sizes where one run takes milliseconds,
so a loaded machine's noise (which only ever adds time) cannot fake or hide a quadratic cost."""

from __future__ import annotations

import gc
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from openrlhf_passk.rewards import maze as reward
from openrlhf_passk.tasks import maze

SMALL = 1 << 16  # characters; 4x is 256 Ki
GRID = maze.generate(9, 3)
PARSED = maze.parse_grid(GRID.grid)


def best_time(fn, repeats: int = 5) -> float:
    """Minimum CPU time of this thread over `repeats` calls, garbage collection off. CPU time, not wall
    time: on a loaded machine a longer call is more often preempted, which would inflate wall time
    with the size for reasons that have nothing to do with the code."""
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return min(times)
    finally:
        gc.enable()


def scales_linearly(make, work, n: int = SMALL, repeats: int = 5, rounds: int = 3) -> tuple[bool, float, float]:
    """(cost(4n) < 6 cost(n), cost(n), cost(4n)) for inputs `make(n)`. A 2 ms allowance covers timer
    granularity and cache effects on inputs that take microseconds; the quadratic costs this guards
    against take seconds at these sizes. A failed comparison is measured again, up to `rounds` times: a
    burst of noise on a shared machine passes the next round, a quadratic cost fails every one."""
    small, large = make(n), make(4 * n)
    for _ in range(rounds):
        t1 = best_time(lambda: work(*small), repeats)
        t4 = best_time(lambda: work(*large), repeats)
        if t4 < 6 * t1 + 0.002:
            return True, t1, t4
    return False, t1, t4


def request_path(query: str, prompt: str, label: str) -> None:
    """What the server and the reward file do per sample once the label is checked."""
    response = reward.extract_response(query, prompt, label)
    maze.parse_answer(response)
    maze.score_parsed(response, PARSED, "strict")
    maze.score_parsed(response, PARSED, "reference")


# Pieces the scorer looks for: markers, tags, the label's own text, and filler.
PIECES = [
    *reward.END_MARKERS,
    *reward.ASSISTANT_MARKERS,
    "<answer>",
    "</answer>",
    "\\boxed{",
    "}",
    "$",
    " ",
    "\n",
    ".",
    "..SE",
    "RRDD",
    "x",
]
units = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join)


def repeat(unit: str, n: int) -> str:
    """About n characters of whole `unit`s: cut mid-unit, the small and the 4x input would end differently
    (a "boxed" with or without its "{"), and take different, each linear, paths through the scorer."""
    return unit * max(1, n // len(unit))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query_unit=units, label_unit=units, prompt_unit=units, prompt_found=st.booleans())
@example(query_unit=".", label_unit="..SE" + "." * 8, prompt_unit="", prompt_found=False)  # label in the query
@example(query_unit="</s>", label_unit="S.E", prompt_unit="", prompt_found=False)  # end markers
@example(query_unit="<answer>", label_unit="x", prompt_unit="<answer>", prompt_found=True)
def test_request_path_is_linear(query_unit, label_unit, prompt_unit, prompt_found):
    def make(n):
        label = repeat(label_unit, n // 2)
        prompt = repeat(prompt_unit, n // 4) if prompt_unit else ""
        query = (prompt if prompt_found else "") + label + repeat(query_unit, n)
        return query, prompt, label

    ok, t1, t4 = scales_linearly(make, request_path)
    assert ok, f"{SMALL} chars: {t1 * 1000:.2f} ms, 4x: {t4 * 1000:.2f} ms"


def test_the_timing_check_catches_quadratic_code():
    """The check above can fail: the old prompt stripping (rfind of the label) is flagged."""

    def make(n):
        label = "..SE" + "." * (n // 2 - 4)
        return label + "." * n, label

    # Smaller sizes than above: the quadratic code takes 0.2 s at 4 x 8 Ki characters already.
    ok, t1, t4 = scales_linearly(make, lambda query, label: query.rfind(label.strip()), n=8192, repeats=3)
    assert not ok, f"quadratic rfind not flagged: {t1 * 1000:.2f} ms, 4x: {t4 * 1000:.2f} ms"


@pytest.mark.parametrize("unit", [" ", "\n", *reward.END_MARKERS])
def test_stripping_a_long_trailer_takes_no_memory_per_character(unit):
    """A response padded with a million characters of whitespace or end markers costs a copy of it, not the
    regex engine's backtracking state for every repetition (which was about 150 bytes per character)."""
    n = 1 << 20
    query = "<answer>R</answer>" + unit * (n // len(unit))
    tracemalloc.start()
    try:
        response = reward.extract_response(query, "", "")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response == "<answer>R</answer>"
    assert peak < 4 * n, f"{peak / n:.1f} bytes per character of trailer"


def test_label_checks_are_linear_in_the_grid():
    def make(n):
        side = int((n / 4) ** 0.5)  # cells grow 4x
        rows = ["." * side for _ in range(side)]
        rows[0], rows[-1] = "S" + rows[0][1:], rows[-1][:-1] + "E"
        return ("\n".join(rows),)

    def check(grid):
        maze._cache.clear()  # the cost of a first sight, not of a cache hit
        maze._cache_state["bytes"] = 0
        reward.check_label(0, grid, max_grid=1000)

    ok, t1, t4 = scales_linearly(make, check)
    assert ok, f"{t1 * 1000:.2f} ms, 4x: {t4 * 1000:.2f} ms"


# --- bounded label work ----------------------------------------------------------------------------


def test_labels_over_the_grid_limit_are_refused_before_parsing(monkeypatch):
    parsed = []
    monkeypatch.setattr(maze, "_parse", lambda grid: parsed.append(grid))
    huge = "\n".join(["S" + "." * 2000] + ["." * 2001] * 1999 + ["." * 2000 + "E"])
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"labels\[0\] has 4006001 characters, more than a 101x101 grid"):
        reward.score_batch(["x"], [""], [huge])
    assert parsed == [] and time.perf_counter() - t0 < 1.0


def test_grid_limit_counts_rows_and_columns():
    wide = "S" + "." * 101 + "E"  # 1 x 103: few characters, but too wide
    with pytest.raises(ValueError, match=r"labels\[1\] is a 1x103 grid, over the grid size limit of 101x101"):
        reward.score_batch(["x", "x"], ["", ""], [GRID.grid, wide])
    assert reward.score_batch(["<answer>R</answer>"], [""], ["SE"], max_grid=5)[0] == [1.0]
    tall = "\n".join(["S", *["."] * 5, "E"])  # 7 x 1
    with pytest.raises(ValueError, match="7x1 grid, over the grid size limit of 5x5"):
        reward.score_batch(["x"], [""], [tall], max_grid=5)


def test_unsolvable_label_is_an_error_in_the_reward_file(caplog):
    walled = "S*E"
    with pytest.raises(ValueError, match=r"labels\[0\] is not a solvable maze"):
        reward.score_batch(["<answer>RR</answer>"], [""], [walled])
    with pytest.raises(ValueError):
        reward.reward_func(["<answer>RR</answer>"], [""], [walled])
    assert any(r.levelname == "ERROR" and "not a solvable maze" in r.getMessage() for r in caplog.records)


def test_each_label_is_parsed_once_per_batch_and_cached(monkeypatch):
    calls = []
    original = maze._parse
    monkeypatch.setattr(maze, "_parse", lambda grid: calls.append(len(grid)) or original(grid))
    big = maze.generate(41, 5)
    maze._cache.pop(big.grid, None)
    rewards, _ = reward.score_batch([f"<answer>{big.solution}</answer>"] * 3, None, [big.grid] * 3)
    assert rewards == [1.0] * 3 and calls == [len(big.grid)]
    reward.score_batch(["x"], None, [big.grid])
    assert calls == [len(big.grid)]  # a cache hit next time


def test_parse_cache_is_bounded_by_bytes(monkeypatch):
    monkeypatch.setattr(maze, "CACHE_BYTES", 2_000_000)
    maze._cache.clear()
    maze._cache_state["bytes"] = 0
    labels = [maze.generate(41, s).grid for s in range(400)]  # ~1.4 MB of text, more with the rows
    for label in labels:
        maze.parse_grid(label)
    # The estimate tracks what is held, and what is held stays under the budget.
    held = sum(3 * len(g) + 60 * 41 + 200 for g in maze._cache)
    assert maze.cache_bytes() == held <= 2_000_000
    assert len(maze._cache) < 400 and labels[-1] in maze._cache and labels[0] not in maze._cache
    maze._cache.clear()
    maze._cache_state["bytes"] = 0


def reference_extract(query: str, prompt: str, grid: str) -> str:
    """The plain (quadratic) definition: cut after the prompt, else the last assistant marker, else the
    last copy of the grid; then strip whitespace and end markers one at a time."""
    at = query.find(prompt) if prompt else -1
    markers = [query.rfind(m) + len(m) for m in reward.ASSISTANT_MARKERS if m in query]
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
    while any(response.endswith(m) for m in reward.END_MARKERS):
        m = next(m for m in reward.END_MARKERS if response.endswith(m))
        response = response[: -len(m)].rstrip()
    return response


small = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(query=small, prompt=small, grid=small, prompt_in_query=st.booleans())
def test_linear_extraction_matches_the_plain_definition(query, prompt, grid, prompt_in_query):
    if prompt_in_query:
        query = query[: len(query) // 2] + prompt + query[len(query) // 2 :]
    assert reward.extract_response(query, prompt, grid) == reference_extract(query, prompt, grid)
