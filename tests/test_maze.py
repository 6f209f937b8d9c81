"""Maze task: generator, solver, validation, both scoring modes, prompts. Expected values come from
hand-worked grids or from brute-force search written here, never from the code under test."""

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_passk.tasks.maze import (
    generate,
    parse_answer,
    render_messages,
    render_prompt,
    score,
    solve,
    validate_grid,
)

# S at (1,1); the only route is R R D D R (E at (3,4)); (3,5) is an open dead end right of E.
GRID = "\n".join(["*******", "*S..*.*", "***.*.*", "*...E.*", "*******"])
# Open border: stepping left of S leaves the grid.
LINE = "S.E"


def cells(grid):
    rows = grid.split("\n")
    return {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}


def bfs_distances(g, start):
    """Steps from `start` to every reachable open cell of the cell map `g`."""
    dist, queue = {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        for nxt in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c)):
            if g.get(nxt, "*") != "*" and nxt not in dist:
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return dist


def brute_force(grid):
    """(shortest length, number of shortest paths) by BFS for the length, then enumerating every
    wall-free walk of that length (exponential, so small mazes only)."""
    g = cells(grid)
    start = next(p for p, ch in g.items() if ch == "S")
    end = next(p for p, ch in g.items() if ch == "E")
    d = bfs_distances(g, start)[end]

    def walks(pos, left):  # every wall-free walk of `left` more moves, ending on E
        if left == 0:
            return int(pos == end)
        r, c = pos
        return sum(
            walks(p, left - 1)
            for p in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c))
            if g.get(p, "*") != "*"
        )

    n = walks(start, d)
    return d, n


def walk_ok(grid, path):
    g = cells(grid)
    pos = next(p for p, ch in g.items() if ch == "S")
    for m in path:
        pos = (pos[0] + {"U": -1, "D": 1}.get(m, 0), pos[1] + {"L": -1, "R": 1}.get(m, 0))
        if g.get(pos, "*") == "*":
            return False
    return g[pos] == "E"


# --- generation ----------------------------------------------------------------------------------


def test_generate_is_deterministic_and_seed_dependent():
    assert generate(11, 7) == generate(11, 7)
    assert generate(11, 7, loops=0.4) == generate(11, 7, loops=0.4)
    assert len({generate(11, s).grid for s in range(20)}) == 20


@pytest.mark.parametrize("size", [4, 3, 43, 10, 0, -5, True, 9.0, "9"])
def test_generate_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        generate(size, 0)


@pytest.mark.parametrize("loops", [-0.1, 1.5, float("nan")])
def test_generate_rejects_bad_loops(loops):
    with pytest.raises(ValueError, match="loops"):
        generate(9, 0, loops=loops)


@pytest.mark.parametrize("size", range(5, 42, 2))
def test_generated_mazes_are_well_formed_and_solved(size):
    for seed, loops in [(0, 0.0), (1, 0.0), (2, 0.3), (3, 1.0)]:
        m = generate(size, seed, loops)
        validate_grid(m.grid)
        rows = m.grid.split("\n")
        assert len(rows) == size and all(len(r) == size for r in rows)
        assert set(rows[0]) == set(rows[-1]) == {"*"} and all(r[0] == r[-1] == "*" for r in rows)
        assert rows[m.start[0]][m.start[1]] == "S" and rows[m.end[0]][m.end[1]] == "E"
        assert m.length == len(m.solution) and walk_ok(m.grid, m.solution)
        assert score(f"<answer>{m.solution}</answer>", m.grid) == 1.0


def test_perfect_mazes_are_trees():
    # loops=0: the open cells form a tree (connected, edges = vertices - 1), so one route only.
    for size, seed in itertools.product((7, 15, 31), range(3)):
        m = generate(size, seed)
        g = {p for p, ch in cells(m.grid).items() if ch != "*"}
        edges = sum((r, c + 1) in g for r, c in g) + sum((r + 1, c) in g for r, c in g)
        seen, stack = {m.start}, [m.start]
        while stack:
            r, c = stack.pop()
            for nxt in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c)):
                if nxt in g and nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        assert seen == g and edges == len(g) - 1 and m.n_shortest == 1


def test_loops_one_opens_every_inner_wall():
    m = generate(11, 5, loops=1.0)
    rows = m.grid.split("\n")
    # Only the border and the pillars (even, even) remain walls.
    for r, c in itertools.product(range(1, 10), range(1, 10)):
        assert (rows[r][c] == "*") == (r % 2 == 0 and c % 2 == 0)


@pytest.mark.parametrize("size,loops", [(7, 0.5), (7, 1.0), (9, 0.5), (9, 1.0), (9, 0.0)])
def test_length_and_route_count_match_brute_force(size, loops):
    for seed in range(4):
        m = generate(size, seed, loops)
        if m.length > 16:  # keep the enumeration small
            continue
        assert (m.length, m.n_shortest) == brute_force(m.grid)


def test_braided_mazes_have_several_routes():
    multi = [generate(9, s, loops=1.0).n_shortest > 1 for s in range(20)]
    assert sum(multi) >= 10


def test_end_is_far_from_start():
    # E is at least half as far from S as the farthest cell (see the module doc).
    for seed in range(10):
        m = generate(13, seed)
        dist = bfs_distances(cells(m.grid), m.start)
        far = max(d for (r, c), d in dist.items() if r % 2 and c % 2)
        assert 2 * dist[m.end] >= far


# --- validation and solving ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,message",
    [
        ("*.*\n*E*", "exactly one 'S'"),
        ("*S*\n*.*", "exactly one 'E'"),
        ("SS\nE.", "exactly one 'S', found 2"),
        ("S.E\n..", "row 1 has 2 characters, expected 3"),
        ("S.E\n.#.", "row 1 column 1 holds '#'"),
        ("S.E\r\n...", "'\\\\r'"),
        ("", "empty"),
        ("   \n ", "empty"),
        (None, "expected a string"),
    ],
)
def test_validate_grid_errors_name_the_problem(grid, message):
    with pytest.raises(ValueError, match=message):
        validate_grid(grid)
    with pytest.raises(ValueError):
        score("<answer>R</answer>", grid)


def test_solve():
    assert solve(GRID) == "RRDDR"
    assert solve(LINE) == "RR"
    with pytest.raises(ValueError, match="cannot be reached"):
        solve("S*E")


# --- scoring -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        "<answer>RRDDR</answer>",
        "reasoning...\n<answer> R R D D R </answer>",
        "<answer>R, R, D, D, R</answer>",
        "<answer>R -> R -> D -> D -> R</answer>",
        "<answer>R→R→D→D→R</answer>",
        "<answer>\\boxed{RRDDR}</answer>",
        "<answer>$\\boxed{R R D D R}$</answer>",
        "<answer>U</answer> wait, no: <answer>RRDDR</answer>",
        "<answer>RRDDRLR</answer>",  # passes E, comes back to it
        "<answer>RRDDR</answer> then a stray <answer>",
    ],
)
def test_strict_accepts(response):
    assert score(response, GRID) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "RRDDR",  # no tag
        "\\boxed{RRDDR}",  # no tag
        "<answer>RRDDR",  # unclosed
        "RRDDR</answer>",  # no opening tag
        "<answer>rrddr</answer>",  # lower case
        "<answer>RRDDR.</answer>",  # other character
        "<answer>path: RRDDR</answer>",
        "<answer>R-R-D-D-R</answer>",  # '-' alone is not an arrow
        "<answer>RRDDRL</answer>",  # ends next to E
        "<answer>RRDDRR</answer>",  # ends right of E
        "<answer>U</answer>",  # wall
        "<answer></answer>",  # stays on S
        "<answer>RRDDR</answer> no: <answer>U</answer>",  # the last one counts
        "<answer>\\boxed{\\text{RRDDR}}</answer>",
    ],
)
def test_strict_rejects(response):
    assert score(response, GRID) == 0.0


def test_leaving_the_grid_scores_zero():
    assert score("<answer>RR</answer>", LINE) == 1.0
    assert score("<answer>LRRR</answer>", LINE) == 0.0
    assert score("<answer>URR</answer>", LINE) == 0.0
    assert score("LRRR", LINE, "reference") == 0.0


# Each expected value below was worked out by hand from the public verifier's published behaviour.
@pytest.mark.parametrize(
    "response,expected",
    [
        ("<answer>RRDDR</answer>", 1.0),
        ("rrddr", 1.0),  # no tags: every letter of the upper-cased response is walked
        ("<answer>rrddr</answer>", 1.0),
        ("I think RRDDR", 1.0),  # "I THINK" holds no move letter
        ("I should go RRDDR", 0.0),  # "SHOULD" adds U, L, D: the U hits the wall above S
        ("Go RIGHT? no: RDDR", 1.0),  # "RIGHT" adds an R: walks R + RDDR
        ("<answer>R R x D D R!</answer>", 1.0),  # other characters skipped
        ("\\boxed{RRDDR} and some text", 1.0),
        ("boxed RRDDR$ UUU", 1.0),  # no brace: up to the first '$'
        ("\\boxed{RR{DD}R}", 1.0),  # brace-matched content, inner braces kept (and skipped)
        ("\\boxed{RRDDR", 1.0),  # unclosed brace: the rest of the text
        ("the answer is boxed", 0.0),  # nothing after "boxed"
        ("<answer>RRDDR</answer> and then <answer>", 0.0),  # the LAST <answer> opens an empty block
        ("<answer>U</answer> <answer>RRDDR</answer>", 1.0),
        ("<answer>RRDDR</answer> ... D", 1.0),  # text outside the block ignored when tags exist
        ("RRDDR ... D", 0.0),  # but walked without tags
    ],
)
def test_reference_mode_quirks(response, expected):
    assert score(response, GRID, "reference") == expected


def test_reference_mode_rejects_grids_without_start():
    # The public verifier asserts here; we raise a clear ValueError for any malformed grid instead.
    with pytest.raises(ValueError, match="'S'"):
        score("RRDDR", GRID.replace("S", "."), "reference")


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        score("<answer>RRDDR</answer>", GRID, "lenient")


def test_parse_answer():
    assert parse_answer("x <answer> R, R -> D </answer>") == "RRD"
    assert parse_answer("<answer>R</answer><answer>bad</answer>") is None
    assert parse_answer("no tags") is None


TOKENS = ["<answer>", "</answer>", "\\boxed{", "boxed", "{", "}", "$", "->", "→", ",", " ", "\n"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(TOKENS + list("LRUDlrudxS.E*")) | st.text(max_size=4), max_size=40).map("".join)
)
def test_score_never_raises_on_any_response(response):
    for mode in ("strict", "reference"):
        assert score(response, GRID, mode) in (0.0, 1.0)
    # Any strictly accepted path really solves the maze.
    path = parse_answer(response)
    assert score(response, GRID) == float(path is not None and walk_ok(GRID, path))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 50),
    st.lists(st.sampled_from([" ", ",", " -> ", "→", ""]), min_size=1),
    st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=30),
)
def test_formatted_solutions_score_in_both_modes(seed, seps, prefix):
    m = generate(9, seed, loops=0.5)
    body = "".join(ch + seps[i % len(seps)] for i, ch in enumerate(m.solution))
    response = f"{prefix}<answer>{body}</answer>"
    assert score(response, m.grid) == 1.0
    assert score(response, m.grid, "reference") == 1.0
    assert score(response.replace("<answer>", ""), m.grid) == 0.0


# --- prompts -------------------------------------------------------------------------------------


def test_prompts():
    text = render_prompt(GRID)
    assert "## Maze\n" + GRID in text and text.endswith(GRID)
    for word in ("'S'", "'E'", "'*'", "'.'", "L:", "R:", "U:", "D:", "<answer>"):
        assert word in text
    assert render_messages(GRID) == [{"role": "user", "content": text}]
    assert render_messages(GRID, system="Be brief.")[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError):
        render_prompt("no maze")
