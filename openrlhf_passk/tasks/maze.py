"""The maze task of Pass@k Training (Chen et al. 2025, appendix A.1): generator, solver, verifier, prompt.

A maze is an n x n text grid, one row per line: 'S' start, 'E' end, '*' wall, '.' open. Moves are
L (column - 1), R (column + 1), U (row - 1) and D (row + 1). A response earns 1.0 iff its path stays
on the grid and off walls and ends on 'E'. Pure Python: no torch, no OpenRLHF.

Generation (deterministic from `(size, seed)`, stable across Python versions because the RNG is seeded
with a string, which CPython hashes with SHA-512):
- cells sit at odd (row, column) coordinates; a randomized depth-first search carves a perfect maze
  (exactly one route between any two cells);
- `loops` in [0, 1] then knocks out that fraction of the remaining removable inner walls (braiding),
  which creates several routes, so that sampling k answers can find different ones;
- 'S' is a uniformly random cell, and 'E' is uniformly random among the cells whose shortest distance
  from 'S' is at least half of the largest one, so no maze is trivially short.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NamedTuple

WALL, OPEN, START, END = "*", ".", "S", "E"
ALLOWED = frozenset(WALL + OPEN + START + END)
MOVES: dict[str, tuple[int, int]] = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
MIN_SIZE, MAX_SIZE = 5, 41
MODES = ("strict", "reference")


@dataclass(frozen=True)
class Maze:
    grid: str  # rows joined by "\n"
    start: tuple[int, int]  # (row, column) of 'S'
    end: tuple[int, int]  # (row, column) of 'E'
    solution: str  # one shortest path, as L/R/U/D letters
    length: int  # its number of moves
    n_shortest: int  # number of distinct shortest paths (1 for a perfect maze)
    size: int
    seed: int
    loops: float = 0.0


# ---------------------------------------------------------------------------------------------------
# Grid parsing and validation


class Grid(NamedTuple):
    """A parsed, well-formed grid: its rows, 'S' and 'E' as (row, column), whether E is reachable, and
    the rows flattened with a wall border (`flat`, row length `stride`) for fast walks."""

    rows: tuple[str, ...]
    start: tuple[int, int]
    end: tuple[int, int]
    solvable: bool
    flat: str
    stride: int


# The reward side scores many responses against the same few thousand labels, so parsed grids are
# cached, bounded by an estimate of their bytes (not by count: one 101x101 label weighs as much as a
# hundred 9x9 ones). A lock, because the reward server scores in a thread pool.
CACHE_BYTES = 32 * 1024 * 1024
_cache: OrderedDict[str, tuple[Grid, int]] = OrderedDict()
_cache_state = {"bytes": 0}
_cache_lock = threading.Lock()


def parse_grid(grid: str) -> Grid:
    """The parsed `grid` (cached); ValueError saying what is wrong and where if it is malformed."""
    if not isinstance(grid, str):
        raise ValueError(f"invalid maze grid: expected a string, got {type(grid).__name__}")
    with _cache_lock:
        hit = _cache.get(grid)
        if hit is not None:
            _cache.move_to_end(grid)
            return hit[0]
    parsed = _parse(grid)
    # Key, rows and flat each hold the text once; about 60 bytes of object header per row string.
    size = 3 * len(grid) + 60 * len(parsed.rows) + 200
    if size <= CACHE_BYTES // 16:
        with _cache_lock:
            if grid not in _cache:
                _cache[grid] = (parsed, size)
                _cache_state["bytes"] += size
            while _cache_state["bytes"] > CACHE_BYTES:
                _, (_, dropped) = _cache.popitem(last=False)
                _cache_state["bytes"] -= dropped
    return parsed


def cache_bytes() -> int:
    """The parse cache's current size estimate in bytes (at most CACHE_BYTES)."""
    return _cache_state["bytes"]


def _parse(grid: str) -> Grid:
    rows = tuple(grid.strip().split("\n"))
    if rows == ("",):
        raise ValueError(
            "invalid maze grid: it is empty (expected rows of '*', '.', 'S', 'E' joined by newlines)"
        )
    width = len(rows[0])
    starts, ends = [], []
    for r, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"invalid maze grid: row {r} has {len(row)} characters, expected {width} "
                "(all rows must have the same length)"
            )
        bad = set(row) - ALLOWED
        if bad:
            c = min(bad)
            raise ValueError(
                f"invalid maze grid: row {r} column {row.index(c)} holds {c!r}; "
                "only '*' (wall), '.' (open), 'S' (start) and 'E' (end) are allowed"
            )
        if START in row:
            starts += [(r, c) for c, ch in enumerate(row) if ch == START]
        if END in row:
            ends += [(r, c) for c, ch in enumerate(row) if ch == END]
    for name, found in (("S", starts), ("E", ends)):
        if len(found) != 1:
            raise ValueError(f"invalid maze grid: expected exactly one '{name}', found {len(found)}")
    start, end = starts[0], ends[0]
    dist, _, w = _bfs(rows, start, counts=False)
    return Grid(rows, start, end, dist[(end[0] + 1) * w + end[1] + 1] >= 0, *_padded(rows))


def validate_grid(grid: str) -> None:
    """Raise ValueError (saying what is wrong and where) unless `grid` is a well-formed maze.

    Well-formed: rectangular rows joined by "\\n" (surrounding whitespace is ignored), only the
    characters '*', '.', 'S', 'E', exactly one 'S' and one 'E'. Solvability is checked by `solve`.
    """
    parse_grid(grid)


# ---------------------------------------------------------------------------------------------------
# Breadth-first search: distances, number of shortest routes, one shortest path


def _padded(rows: tuple[str, ...]) -> tuple[str, int]:
    """The rows as one string with a wall border, and its row length: a step is +-1 or +-stride, and
    stepping off the grid lands on a wall, so walks need no bounds checks."""
    w = len(rows[0]) + 2
    return WALL * w + "".join(WALL + row + WALL for row in rows) + WALL * w, w


def _bfs(
    rows: tuple[str, ...], source: tuple[int, int], counts: bool = True
) -> tuple[list[int], list[int], int]:
    """Distances and shortest-route counts from `source` over a flat grid padded with a wall border.

    Returns (dist, count, padded_width); -1 marks unreachable. Padding removes bounds checks.
    `counts=False` skips the route counts, which grow into huge integers on large open grids.
    """
    flat, w = _padded(rows)
    dist = [-1] * len(flat)
    count = [0] * len(flat)
    src = (source[0] + 1) * w + source[1] + 1
    dist[src], count[src] = 0, 1
    queue = deque([src])
    steps = (-1, 1, -w, w)
    while queue:
        i = queue.popleft()
        d = dist[i] + 1
        for step in steps:
            j = i + step
            if flat[j] == WALL:
                continue
            if dist[j] < 0:
                dist[j] = d
                count[j] = count[i]
                queue.append(j)
            elif counts and dist[j] == d:
                count[j] += count[i]
    return dist, count, w


def _shortest(rows: tuple[str, ...], start: tuple[int, int], end: tuple[int, int]) -> tuple[str, int] | None:
    """One shortest path from start to end (walked back from the end) and the number of such paths."""
    dist, count, w = _bfs(rows, start)
    i = (end[0] + 1) * w + end[1] + 1
    if dist[i] < 0:
        return None
    n_paths = count[i]
    back = []
    # Walk back from E through any neighbour one step closer to S, in a fixed order (deterministic).
    while dist[i] > 0:
        for letter, step in (("R", -1), ("L", 1), ("D", -w), ("U", w)):
            if dist[i + step] == dist[i] - 1:
                back.append(letter)
                i += step
                break
    return "".join(reversed(back)), n_paths


def solve(grid: str) -> str:
    """A shortest L/R/U/D path from 'S' to 'E'. ValueError if the grid is malformed or unsolvable."""
    rows, start, end, *_ = parse_grid(grid)
    found = _shortest(rows, start, end)
    if found is None:
        raise ValueError("invalid maze grid: 'E' cannot be reached from 'S'")
    return found[0]


# ---------------------------------------------------------------------------------------------------
# Generation


def generate(size: int, seed: int, loops: float = 0.0) -> Maze:
    """A solvable `size` x `size` maze, the same for the same (size, seed, loops). See the module doc."""
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or size % 2 == 0
        or not MIN_SIZE <= size <= MAX_SIZE
    ):
        raise ValueError(f"size must be an odd integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(loops, (int, float)) or not 0.0 <= loops <= 1.0:
        raise ValueError(
            f"loops must be a number in [0, 1] (fraction of removable walls knocked out), got {loops!r}"
        )
    rng = random.Random(f"openrlhf-passk-maze/{size}/{seed}")
    n = (size - 1) // 2  # cells per side; cell (r, c) is grid[2r + 1][2c + 1]
    grid = [[WALL] * size for _ in range(size)]

    # Randomized depth-first search ("recursive backtracker"), iterative to bound the stack.
    visited = [[False] * n for _ in range(n)]
    cell = (rng.randrange(n), rng.randrange(n))
    visited[cell[0]][cell[1]] = True
    grid[2 * cell[0] + 1][2 * cell[1] + 1] = OPEN
    stack = [cell]
    while stack:
        r, c = stack[-1]
        options = [
            (r + dr, c + dc)
            for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0))
            if 0 <= r + dr < n and 0 <= c + dc < n and not visited[r + dr][c + dc]
        ]
        if not options:
            stack.pop()
            continue
        nr, nc = options[rng.randrange(len(options))]
        visited[nr][nc] = True
        grid[r + nr + 1][c + nc + 1] = OPEN  # the wall between the two cells
        grid[2 * nr + 1][2 * nc + 1] = OPEN
        stack.append((nr, nc))

    if loops > 0:
        # Removable walls separate two cells: one coordinate odd, the other even, not on the border.
        walls = [
            (i, j)
            for i in range(1, size - 1)
            for j in range(1, size - 1)
            if (i + j) % 2 == 1 and grid[i][j] == WALL
        ]
        for i, j in rng.sample(walls, int(loops * len(walls) + 0.5)):
            grid[i][j] = OPEN

    rows = tuple("".join(row) for row in grid)
    start = (2 * rng.randrange(n) + 1, 2 * rng.randrange(n) + 1)
    dist, _, w = _bfs(rows, start)
    cells = [(2 * r + 1, 2 * c + 1) for r in range(n) for c in range(n)]
    far = max(dist[(i + 1) * w + j + 1] for i, j in cells)
    candidates = [(i, j) for i, j in cells if 2 * dist[(i + 1) * w + j + 1] >= far and (i, j) != start]
    end = candidates[rng.randrange(len(candidates))]
    grid[start[0]][start[1]] = START
    grid[end[0]][end[1]] = END
    rows = tuple("".join(row) for row in grid)
    found = _shortest(rows, start, end)
    assert found is not None, "generator bug: every cell of a carved maze is connected"
    solution, n_shortest = found
    return Maze("\n".join(rows), start, end, solution, len(solution), n_shortest, size, seed, float(loops))


def max_distinct(size: int, loops: float = 0.0) -> int:
    """An upper bound on the number of distinct mazes `generate(size, *, loops)` can return.

    The open passages between cells are a spanning tree plus round(loops * removable walls) more, so
    they are one of C(passages, that many) subsets; S and E are two different cells. Exact enough for
    the small sizes where it matters (5x5: 48, of which 40 occur; 7x7: 35,640).
    """
    n = (size - 1) // 2
    cells = n * n
    passages = 2 * n * (n - 1)  # between horizontally or vertically adjacent cells
    removable = passages - (cells - 1)
    opened = cells - 1 + int(loops * removable + 0.5)
    return math.comb(passages, opened) * cells * (cells - 1)


# ---------------------------------------------------------------------------------------------------
# Scoring

# Strict mode: separators allowed between moves (whitespace, commas, ASCII and Unicode arrows).
_SEPARATORS = re.compile(r"->|=>|[\s,\u2192\u27f6\u21d2\u2794\u279c\u279d\u279e]")
_BOXED = re.compile(r"\$*\s*\\boxed\s*\{([^{}]*)\}\s*\$*")
_PATH = re.compile(r"[LRUD]*")


def parse_answer(response: str) -> str | None:
    """Strict mode's parse: the moves inside the last <answer>...</answer> (optionally in \\boxed{}),
    separators removed; None when there is no complete tag pair or the content is not a clean path."""
    close = response.rfind("</answer>")
    if close < 0:
        return None
    opening = response.rfind("<answer>", 0, close)
    if opening < 0:
        return None
    inner = response[opening + len("<answer>") : close].strip()
    boxed = _BOXED.fullmatch(inner)
    if boxed:
        inner = boxed.group(1)
    path = _SEPARATORS.sub("", inner)
    return path if _PATH.fullmatch(path) else None


def _reference_text(response: str) -> str:
    """The text the public verifier walks, with its quirks (see `score`)."""
    s = response
    if "<answer>" in s and "</answer>" in s:
        # From the LAST "<answer>" up to the first "</answer>" after it (or to the end if none follows).
        s = s[s.rfind("<answer>") + len("<answer>") :]
        close = s.find("</answer>")
        s = (s if close < 0 else s[:close]).strip()
    at = s.rfind("boxed")
    if at < 0:
        return s
    tail = s[at + len("boxed") :]
    if not tail:
        return ""
    if tail[0] != "{":
        return tail.split("$", 1)[0].strip()
    depth, out = 1, []
    for ch in tail[1:]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        out.append(ch)
    return "".join(out)


_NOT_MOVES = re.compile(r"[^LRUD]+")


def _walk(grid: Grid, moves: str) -> float:
    """1.0 iff following the L/R/U/D letters of `moves` (others skipped) stays on open cells and ends on E.

    Off the grid counts as a wall (the padded border). Positions are summed in C (accumulate); Python
    only looks at each cell, since responses of a million moves must score in well under a second.
    """
    w = grid.stride
    step = {"L": -1, "R": 1, "U": -w, "D": w}
    flat = grid.flat
    start = (grid.start[0] + 1) * w + grid.start[1] + 1
    # `initial` makes the first item the start itself, so `here` is bound even without moves.
    for here in itertools.accumulate(map(step.__getitem__, _NOT_MOVES.sub("", moves)), initial=start):  # noqa: B007
        if flat[here] == WALL:
            return 0.0
    return 1.0 if flat[here] == END else 0.0


def score(response: str, grid: str, mode: str = "strict") -> float:
    """1.0 if `response` solves the maze `grid`, else 0.0. Never raises on a response string.

    strict (default): the path is the content of the LAST <answer>...</answer>, optionally as
      \\boxed{...} (with optional $ delimiters); it may hold only the letters L, R, U, D, separated or
      not by whitespace, commas or arrows (->, =>, →, ⟶, ⇒, ➔, ➜, ➝, ➞). Anything else there, or no
      complete tag pair, scores 0.
    reference: the public verifier of the paper, quirks included: the text is the last <answer> block
      when both tags occur anywhere, else the whole response; then the content after the last "boxed"
      (brace-matched, or up to a '$'); it is upper-cased and EVERY L/R/U/D letter in it is walked,
      other characters skipped. Without tags it thus walks the letters of the reasoning text.
      The public verifier crashes on a grid without 'S'; here both modes raise ValueError for any
      malformed grid (see `validate_grid`), so a bad label is never silently scored 0.
    """
    return score_parsed(response, parse_grid(grid), mode)


def score_parsed(response: str, grid: Grid, mode: str = "strict") -> float:
    """`score` against an already parsed grid (see `parse_grid`): the reward side parses each label once."""
    if not isinstance(response, str):
        raise ValueError(f"response must be a string, got {type(response).__name__}")
    if mode == "strict":
        path = parse_answer(response)
        return 0.0 if path is None else _walk(grid, path)
    if mode == "reference":
        return _walk(grid, _reference_text(response).upper())
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------------
# Prompts

_INSTRUCTIONS = """\
Solve the maze below. It is drawn as a grid of characters, one row per line:
- 'S' is where you start and 'E' is the exit you must reach.
- '*' is a wall: you can never step onto it.
- '.' is an open cell you can walk through.

You move one cell at a time with these letters:
- L: one column to the left
- R: one column to the right
- U: one row up
- D: one row down
A path must stay inside the grid and never enter a wall.

Reason about the maze first if you like, then write the whole path from S to E as a string of move \
letters inside answer tags, for example <answer>RRDDL</answer>.

## Maze
"""


def render_prompt(grid: str) -> str:
    """The task as plain text. The grid comes last, so text after it in a query is the response."""
    validate_grid(grid)
    return _INSTRUCTIONS + grid.strip()


def render_messages(grid: str, system: str | None = None) -> list[dict[str, str]]:
    """The task as chat messages (for OpenRLHF's --apply_chat_template), with an optional system message."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": render_prompt(grid)}]
