"""A failing reward source stops the run loudly, through the REAL upstream reward call
(`openrlhf.utils.agent.SingleTurnAgentExecutor.execute`, patched by the .pth hook: `reward`), on 0.11.2 and,
with its copy first on PYTHONPATH, 0.9.10. Also the checks the driver makes before training
(`reward_preflight`).

HTTP cases talk to a tiny server on 127.0.0.1; upstream's 1 s pause between its 5 tries is shortened
(asyncio.sleep is counted, not skipped), so the retries still happen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from helpers import free_port

from openrlhf_passk import env
from openrlhf_passk.integration import reward, reward_preflight

TOKEN = "secret-token-42"


class CharTokenizer:
    """One token per character: enough for the executor's tokenize/decode round trip (no download)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Stands in for the vLLM engine: 'generates' a fixed response."""

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = SimpleNamespace(token_ids=[ord(c) for c in "RRDD"], text="RRDD", finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def run_sample(executor):
    params = SimpleNamespace(max_tokens=16, logprobs=None)
    return asyncio.run(executor.execute("maze?", "label", params, 64, CharTokenizer(), FakeEngine()))


@pytest.fixture
def agent_errors():
    """ERROR records of OpenRLHF's agent logger (it does not propagate, so caplog cannot see them)."""
    from openrlhf.utils import agent

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    agent.logger.addHandler(handler)
    yield records
    agent.logger.removeHandler(handler)


def reward_file(tmp_path, body: str) -> str:
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_good_reward_file_passes_through(tmp_path):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    path = reward_file(
        tmp_path,
        """
        import torch
        def reward_func(queries, prompts, labels, **kw):
            return {"rewards": torch.tensor([float(queries[0].endswith("RRDD"))]), "scores": torch.tensor([0.5])}
        """,
    )
    out = run_sample(SingleTurnAgentExecutor(remote_rm_url=path))
    assert out["reward"].tolist() == [1.0] and out["scores"].tolist() == [0.5]


def test_reward_file_that_raises_stops_the_run(tmp_path, agent_errors):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    body = "def reward_func(queries, prompts, labels, **kw):\n    raise KeyError('no such maze')\n"
    path = reward_file(tmp_path, body)
    with pytest.raises(RuntimeError) as info:
        run_sample(SingleTurnAgentExecutor(remote_rm_url=path))
    message = str(info.value)
    assert f"reward file {path} failed" in message and "KeyError: 'no such maze'" in message
    assert "Fix: fix reward_func" in message and f"{env.DISABLE}=1" in message
    assert isinstance(info.value.__cause__, KeyError)
    assert [r.getMessage() for r in agent_errors] == [message]
    reward._logged_traceback.clear()  # the first failure of a process logs the original's traceback
    with pytest.raises(RuntimeError):
        run_sample(SingleTurnAgentExecutor(remote_rm_url=path))
    assert isinstance(agent_errors[1].exc_info[1], KeyError)


@pytest.mark.parametrize(
    "returned,expected",
    [("[1.0]", "expected a dict with 'rewards', got list: [1.0]"), ("{'score': 1.0}", "has no 'rewards'")],
)
def test_malformed_reward_file_result_stops_the_run(tmp_path, returned, expected):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    path = reward_file(tmp_path, f"def reward_func(queries, prompts, labels, **kw):\n    return {returned}\n")
    with pytest.raises(RuntimeError, match="malformed reward response") as info:
        run_sample(SingleTurnAgentExecutor(remote_rm_url=path))
    assert expected in str(info.value) and path in str(info.value)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.health_calls += 1
        ok = self.path == "/health" and server.health_calls > server.health_starting
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}' if ok else b'{"status": "starting"}')

    def do_POST(self):
        self.server.posts.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = self.server.post_status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"rewards": [1.0], "scores": [1.0]}' if status == 200 else b'{"error": "boom"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.posts, server.health_calls, server.health_starting = [], 0, 0
    server.auth, server.post_status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def quick_retries(monkeypatch):
    """Upstream waits 1 s between HTTP tries; record the pauses and wait 0 s instead."""
    pauses: list[float] = []
    original = asyncio.sleep

    async def sleep(delay, result=None):
        pauses.append(delay)
        return await original(0, result)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return pauses


def test_http_500_stops_the_run_after_upstream_retries(http_server, quick_retries, agent_errors):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    http_server.post_status = 500
    url = f"http://127.0.0.1:{http_server.server_port}/reward?token={TOKEN}"
    with pytest.raises(RuntimeError) as info:
        run_sample(SingleTurnAgentExecutor(remote_rm_url=url))
    message = str(info.value)
    assert f"reward server http://127.0.0.1:{http_server.server_port}/reward?... failed" in message
    assert "500" in message and "Internal Server Error" in message  # upstream's per-try cause, quoted
    assert TOKEN not in message
    assert len(http_server.posts) == 5 and quick_retries.count(1) == 5  # upstream's 5 tries, 1 s apart
    assert len(agent_errors) == 1


def test_http_connection_refused_stops_the_run(quick_retries):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(RuntimeError, match="reward server http://127.0.0.1:.* failed") as info:
        run_sample(SingleTurnAgentExecutor(remote_rm_url=url))
    assert "Cannot connect to host 127.0.0.1" in str(info.value)
    assert "check the reward server is running" in str(info.value)


def test_hook_disabled_keeps_upstream_behaviour(tmp_path, subprocess_env):
    """OPENRLHF_PASSK_DISABLE=1: upstream swallows the error and the reward is None (as before us)."""
    path = reward_file(tmp_path, "def reward_func(queries, prompts, labels, **kw):\n    raise KeyError('x')\n")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_integration_reward import run_sample
        from openrlhf.utils.agent import SingleTurnAgentExecutor
        out = run_sample(SingleTurnAgentExecutor(remote_rm_url={path!r}))
        print("REWARD", out["reward"], "WRAPPED", hasattr(SingleTurnAgentExecutor.execute, "__wrapped__"))
        """
    )
    env = {**subprocess_env, "OPENRLHF_PASSK_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REWARD None WRAPPED False" in run.stdout
    assert "Failed to fetch reward from remote RM" in run.stdout  # upstream's INFO line


# --- readiness (driver side) -------------------------------------------------------------------------


def test_wait_ready_times_out_with_the_url_on_a_free_port():
    url = f"http://127.0.0.1:{free_port()}/reward?token={TOKEN}"
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        reward_preflight.wait_ready(url, wait_s=1.0, flag="--remote_rm_url", interval=0.2)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "reward server http://127.0.0.1:" in message and "not ready after 1 s" in message
    assert "--passk_reward_wait" in message and TOKEN not in message


def test_wait_ready_waits_for_a_starting_server(http_server):
    http_server.health_starting = 2  # answers 503 twice, as our server does before its self-check
    url = f"http://127.0.0.1:{http_server.server_port}/?token={TOKEN}"
    detail = reward_preflight.wait_ready(url, wait_s=30, flag="--remote_rm_url", interval=0.05)
    assert "/health answered 200; a probe sample was answered 200" in detail and http_server.health_calls == 3
    assert http_server.posts == [f"/?token={TOKEN}"]  # one probe sample, after /health said ready


def test_a_server_that_answers_5xx_is_not_ready(http_server, capsys):
    """/health says 200 but a probe sample gets 500: every sample would fail, so the wait (and a dry run)
    stop at once with the status, instead of starting Ray and the models; a real run exits 2, as the dry run
    refuses it."""
    http_server.post_status = 500
    url = f"http://127.0.0.1:{http_server.server_port}/"
    start = time.monotonic()
    with pytest.raises(ValueError, match="answered a probe sample with 500: it is up but fails on a request"):
        reward_preflight.wait_ready(url, wait_s=30, flag="--remote_rm_url", interval=0.05)
    assert time.monotonic() - start < 10  # not the 30 s wait
    with pytest.raises(ValueError, match="--reward.remote_url: the reward server .* answered a probe sample with 500"):
        reward_preflight.check_sources(url, "--reward.remote_url", dry_run=True)
    started = []
    with pytest.raises(SystemExit) as info:
        reward_preflight.wrap_train(started.append, [url], 30, "--remote_rm_url")("args")
    assert info.value.code == 2 and started == []
    assert "[openrlhf-passk] error: --remote_rm_url: the reward server" in capsys.readouterr().err


def test_a_health_that_answers_5xx_is_a_broken_server(http_server, capsys):
    """/health answering 5xx: a dry run refuses it at once; a real run waits it out (our server answers 503
    while it starts), then exits 2. Both say the server answered 5xx, not that it is unreachable."""
    http_server.health_starting = 10**9  # 503 to every /health
    url = f"http://127.0.0.1:{http_server.server_port}/"
    with pytest.raises(ValueError) as info:
        reward_preflight.check_sources(url, "--reward.remote_url", dry_run=True)
    message = str(info.value)
    assert "(--reward.remote_url) answered 5xx: it is up but broken" in message and "/health answered 503" in message
    assert "not reachable" not in message and http_server.posts == []
    with pytest.raises(ValueError, match=r"answered 5xx: it is up but broken .* still after 0.5 s"):
        reward_preflight.wait_ready(url, wait_s=0.5, flag="--remote_rm_url", interval=0.05)
    assert http_server.health_calls > 2  # it kept asking until the wait ended
    started = []
    with pytest.raises(SystemExit) as info:
        reward_preflight.wrap_train(started.append, [url], 0.1, "--remote_rm_url")("args")
    err = capsys.readouterr().err
    assert info.value.code == 2 and started == []
    assert "answered 5xx: it is up but broken" in err and "not reachable" not in err


def test_nothing_answering_exits_1_after_the_wait(capsys):
    started = []
    with pytest.raises(SystemExit) as info:
        reward_preflight.wrap_train(started.append, [f"http://127.0.0.1:{free_port()}/"], 0.3, "--remote_rm_url")("a")
    assert info.value.code == 1 and started == [] and "is not ready after 0.3 s" in capsys.readouterr().err


def test_mixed_or_several_reward_files_are_refused(tmp_path):
    """OpenRLHF scores every sample with the first .py when one comes first (the URL is never called), and
    otherwise POSTs to each entry in turn, the .py path included: both refused before Ray, with the reason."""
    path = reward_file(tmp_path, "def reward_func(queries, prompts, labels):\n    return {}\n")
    url = "http://127.0.0.1:5000/get_reward?token=s3cret"
    for value in (f"{path},{url}", f"{url},{path}"):
        with pytest.raises(ValueError, match="mixes a .py reward file and URLs: OpenRLHF scores every sample") as info:
            reward_preflight.check_sources(value, "--reward.remote_url", dry_run=False)
        assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="names 2 reward files .* OpenRLHF loads only the first one"):
        reward_preflight.check_sources(f"{path},{path}", "--reward.remote_url", dry_run=False)


def test_check_sources_reward_files(tmp_path):
    flag = "--remote_rm_url"
    with pytest.raises(ValueError, match=f"{flag}: reward file .*nope.py does not exist"):
        reward_preflight.check_sources(str(tmp_path / "nope.py"), flag, dry_run=True)
    path = reward_file(tmp_path, "import no_such_module_xyz\n")
    with pytest.raises(ValueError, match="failed to load: ModuleNotFoundError.*absolute imports"):
        reward_preflight.check_sources(path, flag, dry_run=False)
    path = reward_file(tmp_path, "def reward(queries, prompts, labels):\n    return {}\n")
    with pytest.raises(ValueError, match="defines no function reward_func"):
        reward_preflight.check_sources(path, flag, dry_run=False)
    path = reward_file(tmp_path, "def reward_func(queries, prompts, labels):\n    return {}\n")
    report, warnings = reward_preflight.check_sources(path, flag, dry_run=False)
    assert report[0]["source"] == path and warnings == []


def test_check_sources_urls_probe_only_in_dry_run(http_server):
    down = f"http://127.0.0.1:{free_port()}/"
    up = f"http://127.0.0.1:{http_server.server_port}/"
    report, warnings = reward_preflight.check_sources(f"{down},{up}", "--reward.remote_url", dry_run=True)
    assert "is not reachable" in report[0]["health"] and report[1]["health"].endswith("answered 200")
    assert len(warnings) == 1 and down in warnings[0]
    report, warnings = reward_preflight.check_sources(down, "--reward.remote_url", dry_run=False)
    assert "health" not in report[0] and warnings == [] and http_server.health_calls == 1


# --- the reward token, sent as a Bearer header, and the probe sample that checks it before training ------


def test_token_env_makes_openrlhfs_client_send_a_bearer_header(http_server, monkeypatch):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    url = f"http://127.0.0.1:{http_server.server_port}/reward"
    monkeypatch.delenv(reward.TOKEN_ENV, raising=False)
    assert run_sample(SingleTurnAgentExecutor(remote_rm_url=url))["reward"] == [1.0]
    monkeypatch.setenv(reward.TOKEN_ENV, TOKEN)
    assert run_sample(SingleTurnAgentExecutor(remote_rm_url=url))["reward"] == [1.0]
    assert http_server.auth == [None, f"Bearer {TOKEN}"] and http_server.posts == ["/reward", "/reward"]


def test_token_header_with_openrlhf_0_9_10(http_server, subprocess_env):
    old = os.path.join(os.path.dirname(__file__), "..", ".venv", "openrlhf-0.9.10")
    if not os.path.isdir(old):
        pytest.skip("the 0.9.10 copy from `make install` is not present")
    http_server.post_status = 200
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import openrlhf
        from test_integration_reward import run_sample
        from openrlhf.utils.agent import SingleTurnAgentExecutor
        url = "http://127.0.0.1:{http_server.server_port}/"
        print("VERSION", openrlhf.__file__, "REWARD", run_sample(SingleTurnAgentExecutor(remote_rm_url=url))["reward"])
        """
    )
    path = os.pathsep.join([os.path.abspath(old), subprocess_env["PYTHONPATH"]])
    env = {**subprocess_env, "PYTHONPATH": path, reward.TOKEN_ENV: TOKEN}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "openrlhf-0.9.10" in run.stdout and "REWARD [1.0]" in run.stdout
    assert http_server.auth == [f"Bearer {TOKEN}"]


def test_empty_token_env_stops_the_run_naming_the_variable(http_server, monkeypatch, quick_retries):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    http_server.post_status = 200
    monkeypatch.setenv(reward.TOKEN_ENV, "")
    with pytest.raises(RuntimeError, match=f"{reward.TOKEN_ENV} is set but empty"):
        run_sample(SingleTurnAgentExecutor(remote_rm_url=f"http://127.0.0.1:{http_server.server_port}/"))
    assert http_server.posts == []  # nothing was sent without the token
    with pytest.raises(ValueError, match=f"{reward.TOKEN_ENV} is set but empty"):
        reward_preflight.check_sources(f"http://127.0.0.1:{http_server.server_port}/", "--remote_rm_url", dry_run=False)


def test_refused_token_is_redacted_in_the_failure_message(http_server, monkeypatch, quick_retries):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    http_server.post_status = 401
    monkeypatch.setenv(reward.TOKEN_ENV, "env-token-77")
    url = f"http://127.0.0.1:{http_server.server_port}/reward?token={TOKEN}"
    with pytest.raises(RuntimeError) as info:
        run_sample(SingleTurnAgentExecutor(remote_rm_url=url))
    message = str(info.value)
    assert "401" in message and "Unauthorized" in message and "/reward?..." in message
    assert TOKEN not in message and "env-token-77" not in message
    assert reward.redact_text("Bearer env-token-77 at http://h/?token=x&y=1") == "Bearer *** at http://h/?..."


def test_probe_sample_fails_a_wrong_token_in_dry_run_and_real_run(http_server, monkeypatch, capsys):
    monkeypatch.setenv(reward.TOKEN_ENV, TOKEN)
    url = f"http://127.0.0.1:{http_server.server_port}/reward"
    http_server.post_status = 200
    report, warnings = reward_preflight.check_sources(url, "--remote_rm_url", dry_run=True)
    assert report[0]["probe_sample"] == "a probe sample was answered 200" and warnings == []
    assert http_server.auth == [f"Bearer {TOKEN}"]
    for status in (401, 403):
        http_server.post_status = status
        with pytest.raises(ValueError) as info:
            reward_preflight.check_sources(url, "--remote_rm_url", dry_run=True)
        message = str(info.value)
        assert f"refused a probe sample with {status}" in message and reward.TOKEN_ENV in message
        assert "Bearer header" in message and TOKEN not in message
    # A real run: the pre-training wait fails the same way, and wrap_train exits 2 with the message.
    with pytest.raises(ValueError, match="the reward token is missing or wrong"):
        reward_preflight.wait_ready(url, wait_s=5, flag="--remote_rm_url", interval=0.05)
    monkeypatch.delenv(reward.TOKEN_ENV)
    started = []
    with pytest.raises(SystemExit) as info:
        reward_preflight.wrap_train(started.append, [url + f"?token={TOKEN}"], 5, "--remote_rm_url")("args")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no ?token=" not in err and "the URL's ?token=" in err
    assert TOKEN not in err and started == []


def test_probe_sample_against_the_real_server(monkeypatch):
    """Our own server accepts the probe sample with the right token and refuses it without."""
    import uvicorn

    from openrlhf_passk.rewards.server import create_app
    from openrlhf_passk.tasks.maze import score

    assert score(reward_preflight.PROBE_SAMPLE["query"][0], reward_preflight.PROBE_SAMPLE["labels"][0]) == 1.0

    config = uvicorn.Config(create_app(token=TOKEN), host="127.0.0.1", port=free_port(), log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{config.port}/"
        monkeypatch.setenv(reward.TOKEN_ENV, TOKEN)
        assert "answered 200" in reward_preflight.wait_ready(url, wait_s=30, flag="--remote_rm_url", interval=0.1)
        monkeypatch.setenv(reward.TOKEN_ENV, "wrong")
        assert reward_preflight.probe_sample(url)[0] is False
    finally:
        server.should_exit = True
        thread.join(timeout=15)
