"""The reward server under attack: hostile requests (bodies that made the scorer quadratic, huge labels,
clients that hang up or stall, wrong tokens), each against the real `openrlhf-passk serve-reward` with ONE
worker on 127.0.0.1. Each must be answered (or cut off) within
5 s, /health must keep answering, nothing may count as an internal error, and the worker must not die
(its pid stays the same)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import reward_server

from openrlhf_passk.cli import main
from openrlhf_passk.tasks.maze import generate, render_prompt

TOKEN = "s3cret-reward-token"
LIMIT_S = 5.0  # the bound for every hostile request, with one worker
GRID = generate(9, 1)
GOOD = {"query": [f"<answer>{GRID.solution}</answer>"], "prompts": [""], "labels": [GRID.grid]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One worker; the token from a file; small limits so the attacks stay cheap for the test machine."""
    tmp = tmp_path_factory.mktemp("reward-attack")
    (tmp / "token").write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENRLHF_PASSK_REWARD_TOKEN"}
    log_path = tmp / "server.log"
    flags = ["--workers", "1", "--token-file", str(tmp / "token"), "--max-body-bytes", str(6 << 20)]
    flags += ["--max-samples", "64", "--max-query-chars", "1100000", "--max-grid", "51", "--header-timeout", "1"]
    # --log-level debug: a disconnect must show as one DEBUG line, never a traceback.
    flags += ["--body-timeout", "2", "--log-level", "debug"]
    with reward_server(*flags, log=log_path, env=env, wait_s=60) as (proc, base, port):
        pid = httpx.get(base + "/health", timeout=5).json()["pid"]
        yield {"base": base, "port": port, "log": log_path, "pid": pid, "proc": proc}


def post(server, body, headers=AUTH, path="/"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.monotonic()
    r = httpx.post(server["base"] + path, content=content, headers=headers, timeout=30)
    return r, time.monotonic() - t0


def metric(server, name):
    time.sleep(0.1)  # one worker keeps its counters in memory: no flush delay
    for line in httpx.get(server["base"] + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_alive(server):
    health = httpx.get(server["base"] + "/health", timeout=LIMIT_S)
    assert health.status_code == 200 and health.json()["pid"] == server["pid"]
    assert server["proc"].poll() is None


def grid_text(n):
    """An open n x n grid, S top left, E bottom right."""
    rows = ["." * n for _ in range(n)]
    rows[0] = "S" + rows[0][1:]
    rows[-1] = rows[-1][:-1] + "E"
    return "\n".join(rows)


# --- hostile bodies are answered quickly -----------------------------------------------------------

HOSTILE = {
    # The label recurs in a long query (a right-to-left search is quadratic there: 7.1 s at 256 KiB).
    "label_in_query": (
        {"query": ["..SE" + "." * 65532 + "." * 131072], "prompts": [""], "labels": ["..SE" + "." * 65532]},
        422,
        "grid size limit",
    ),
    # The same shape with a label inside the limits: it must be scored, in linear time.
    "valid_label_in_query": (
        {"query": [grid_text(51) * 20], "prompts": [""], "labels": [grid_text(51)]},
        200,
        None,
    ),
    # End markers, stripped one by one, are quadratic (1 MiB took 16 s).
    "end_markers": ({"query": ["</s>" * 262144], "prompts": [""], "labels": [GRID.grid]}, 200, None),
    # A 2001x2001 label: 4.6 s of CPU per sample without the grid limit.
    "huge_label": ({"query": ["x"], "prompts": [""], "labels": [grid_text(2001)]}, 422, "--max-grid"),
    "label_over_grid_limit": ({"query": ["x"], "prompts": [""], "labels": [grid_text(53)]}, 422, "51x51"),
    "too_many_samples": ({"query": ["x"] * 65, "prompts": [""] * 65, "labels": [GRID.grid] * 65}, 413, "--max-samples"),
    "query_too_long": ({"query": ["x" * 1100001], "prompts": [""], "labels": [GRID.grid]}, 413, "--max-query-chars"),
    "unsolvable_label": ({"query": ["<answer>RR</answer>"], "prompts": [""], "labels": ["S*E"]}, 422, "not a solvable"),
    "deep_json": (b"[" * 200000, 400, "nested too deeply"),
    "body_over_limit": (b"x" * (6 << 20) + b"x", 413, "--max-body-bytes"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_is_answered_within_the_limit(server, name):
    body, status, message = HOSTILE[name]
    r, took = post(server, body)
    assert r.status_code == status, r.text[:300]
    assert took < LIMIT_S, f"{name} took {took:.2f} s"
    if message:
        assert message in r.json()["error"]
    assert_alive(server)


def test_health_answers_while_a_large_batch_is_scored(server):
    # 64 samples of 90k moves, walked step by step in both modes: about 6 MB and a few seconds of
    # scoring in the worker's thread pool. Only probes answered while it runs count.
    query = "<answer>" + "RL" * 45000 + "</answer>"
    batch = {"query": [query] * 64, "prompts": [""] * 64, "labels": ["S.E"] * 64}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(post, server, batch)
        during = []
        while not future.done() and time.monotonic() - started < 60:
            t0 = time.monotonic()
            status = httpx.get(server["base"] + "/health", timeout=LIMIT_S).status_code
            if not future.done():
                during.append((status, time.monotonic() - t0))
            time.sleep(0.05)
        r, took = future.result()
    assert r.status_code == 200 and r.json()["rewards"] == [0.0] * 64  # RL... ends back on S
    assert during and all(status == 200 and t < LIMIT_S for status, t in during), during


def test_many_distinct_labels_and_a_normal_request_afterwards(server):
    batch = {
        "query": [f"<answer>{m.solution}</answer>" for m in (generate(41, s) for s in range(32))],
        "prompts": [""] * 32,
        "labels": [generate(41, s).grid for s in range(32)],
    }
    r, took = post(server, batch)
    assert r.status_code == 200 and r.json()["rewards"] == [1.0] * 32 and took < LIMIT_S


# --- clients that hang up or stall: no worker may wait on them -------------------------------------


def raw_request(server, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=10)
    sock.sendall(head + body)
    return sock


def test_client_disconnect_mid_body_is_counted_not_an_internal_error(server):
    before = metric(server, 'openrlhf_passk_reward_errors_total{kind="client_disconnect"}')
    for _ in range(20):
        head = f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n"
        sock = raw_request(server, head.encode(), b'{"query": ["')
        sock.close()
    deadline = time.monotonic() + 20
    while metric(server, 'openrlhf_passk_reward_errors_total{kind="client_disconnect"}') < before + 20:
        assert time.monotonic() < deadline, server["log"].read_text()[-2000:]
        time.sleep(0.2)
    assert metric(server, 'openrlhf_passk_reward_errors_total{kind="internal"}') == 0
    log = server["log"].read_text()
    assert "Traceback" not in log and "disconnected before sending its whole body" in log
    assert_alive(server)


def test_slow_headers_are_cut_off(server):
    sock = raw_request(server, b"POST / HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    t0 = time.monotonic()
    sock.settimeout(LIMIT_S + 5)
    data = b""
    try:
        while chunk := sock.recv(4096):  # trickling bytes would not help either: the deadline is fixed
            data += chunk
    except OSError:
        pass
    assert time.monotonic() - t0 < LIMIT_S, "the server kept a connection with incomplete headers"
    sock.close()
    assert_alive(server)


def test_slow_body_gets_408(server):
    head = f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n"
    sock = raw_request(server, head.encode(), b'{"query": [')
    sock.settimeout(LIMIT_S + 5)
    t0 = time.monotonic()
    data = b""
    while chunk := sock.recv(4096):  # the server answers, then closes the connection
        data += chunk
    assert time.monotonic() - t0 < LIMIT_S
    sock.close()
    assert data.startswith(b"HTTP/1.1 408") and b"--body-timeout" in data
    assert_alive(server)


# --- auth, HEAD, docs, logs ------------------------------------------------------------------------


def test_token_by_header_or_query_and_wrong_ones(server):
    assert post(server, GOOD)[0].json()["rewards"] == [1.0]
    assert post(server, GOOD, headers={}, path=f"/?token={TOKEN}")[0].status_code == 200
    for headers, path in (({}, "/"), ({"Authorization": "Bearer nope"}, "/"), ({}, "/?token=nope")):
        r, _ = post(server, GOOD, headers=headers, path=path)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        assert TOKEN not in r.text


def test_head_health_docs_off_and_one_listening_line(server):
    assert httpx.head(server["base"] + "/health", timeout=10).status_code == 200
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(server["base"] + path, timeout=10).status_code == 404
    log = server["log"].read_text()
    assert log.count(f"listening on http://127.0.0.1:{server['port']}") == 1
    assert TOKEN not in log


def test_no_internal_errors_after_everything(server):
    """Whatever ran before in this module (or alone: every hostile body once more, now), no request may have
    hit an internal error, and the server still serves."""
    for body, status, _ in HOSTILE.values():
        assert post(server, body)[0].status_code == status
    assert post(server, GOOD)[0].json()["rewards"] == [1.0]
    assert metric(server, "openrlhf_passk_reward_requests_total") >= len(HOSTILE)  # the counters count
    assert metric(server, 'openrlhf_passk_reward_errors_total{kind="internal"}') == 0
    assert "Traceback" not in server["log"].read_text()
    assert_alive(server)


# --- in process: request timeout, docs on ---------------------------------------------------------


def test_request_timeout_gives_503_and_the_app_keeps_serving():
    from fastapi.testclient import TestClient

    from openrlhf_passk.rewards.server import create_app

    # Seconds of work (64 x 200k moves, walked in both modes) against a 0.05 s budget: the outcome
    # does not depend on the machine's speed.
    slow = {"query": ["<answer>" + "RL" * 100000 + "</answer>"] * 64, "prompts": [""] * 64, "labels": ["S.E"] * 64}
    with TestClient(create_app(request_timeout=0.05, max_query_chars=1 << 20, max_body_bytes=32 << 20)) as client:
        r = client.post("/", content=json.dumps(slow))
        assert r.status_code == 503 and "--request-timeout" in r.json()["error"]
        assert client.get("/health").status_code == 200
        assert client.post("/", json=GOOD).json()["rewards"] == [1.0]


def test_docs_only_with_the_flag():
    from fastapi.testclient import TestClient

    from openrlhf_passk.rewards.server import create_app

    with TestClient(create_app(docs=True)) as client:
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


# --- command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,env,message",
    [
        ([], {"OPENRLHF_PASSK_REWARD_TOKEN": ""}, "OPENRLHF_PASSK_REWARD_TOKEN is set but empty"),
        ([], {"OPENRLHF_PASSK_REWARD_TOKEN": "  "}, "OPENRLHF_PASSK_REWARD_TOKEN is set but empty"),
        (["--token", ""], {}, "--token must not be empty"),
        (["--token-file", "EMPTY"], {}, "is empty"),
        (["--token-file", "MISSING"], {}, "cannot read it"),
        (["--token-file", "EMPTY", "--token", "x"], {}, "not both"),
        (["--max-samples", "0", "--request-timeout", "0"], {}, "--request-timeout must be a positive"),
        (["--max-grid", "3"], {}, "--max-grid must be at least 5"),
    ],
)
def test_bad_options_exit_2_without_starting(tmp_path, monkeypatch, capsys, argv, env, message):
    (tmp_path / "EMPTY").write_text("\n")
    argv = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in argv]
    monkeypatch.delenv("OPENRLHF_PASSK_REWARD_TOKEN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve-reward", "--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_token_flag_warns_about_ps(monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(kw))
    monkeypatch.delenv("OPENRLHF_PASSK_REWARD_TOKEN", raising=False)
    # run() hands its settings to the workers through these; restored after the test.
    monkeypatch.setenv("OPENRLHF_PASSK_SERVE_CONFIG", "")
    monkeypatch.setenv("OPENRLHF_PASSK_SERVE_HEADER_TIMEOUT", "")
    assert main(["serve-reward", "--token", "abc", "--workers", "1"]) == 0
    assert "prefer --token-file" in capsys.readouterr().err
    assert calls[0]["limit_concurrency"] == 2048 and calls[0]["access_log"] is False
    settings = json.loads(os.environ["OPENRLHF_PASSK_SERVE_CONFIG"])
    assert settings["token"] == "abc" and settings["max_grid"] == 101


def test_prompt_in_a_long_query_still_cut():
    """Linear-time extraction keeps its meaning: the prompt's example answer is never scored."""
    from openrlhf_passk.rewards.maze import extract_response

    prompt = render_prompt(GRID.grid)
    assert extract_response(prompt + "  I give up </s><|im_end|>\n", prompt, GRID.grid) == "  I give up"
    assert extract_response("junk " + prompt + "<answer>R</answer>", "", GRID.grid) == "<answer>R</answer>"


def test_port_in_use_is_a_runtime_error_exit_1(subprocess_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "openrlhf_passk.cli", "serve-reward", "--port", str(port), "--workers", "1"],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1 and "could not run" in out.stderr and "Traceback" not in out.stderr
