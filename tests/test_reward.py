"""The maze reward through OpenRLHF's own client code (`openrlhf.utils.agent.SingleTurnAgentExecutor`):
the reward_func file path and the HTTP path against the real server (uvicorn, 2 workers, subprocess)."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from helpers import reward_server

from openrlhf_passk.tasks.maze import render_messages, render_prompt

REPO = Path(__file__).resolve().parent.parent
REWARD_FILE = REPO / "openrlhf_passk" / "rewards" / "maze.py"
TOKEN = "test-token-123"
# "RRDDL" (the example answer in our prompt) solves this maze, so scoring the prompt by mistake
# turns a wrong response into a reward of 1.
TRAP = "S..*\n**.*\n.E.*"
GOOD = "Let me see.\n<answer>RRDDL</answer>"
BAD = "I am not sure."
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer with ChatML special tokens, built offline (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    hf.chat_template = CHATML
    return hf


class FakeEngine:
    """Stands in for the vLLM engine: 'generates' a fixed response."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer(text=text, add_special_tokens=False)["input_ids"]
        self.text = text

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = SimpleNamespace(token_ids=self.ids, text=self.text, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def run_executor(executor, tokenizer, prompt, response, label=TRAP):
    """One rollout through OpenRLHF's SingleTurnAgentExecutor.execute (tokenize, generate, decode, reward)."""
    params = SimpleNamespace(max_tokens=256, logprobs=None)
    engine = FakeEngine(tokenizer, response + "<|im_end|>")
    return asyncio.run(executor.execute(prompt, label, params, 4096, tokenizer, engine))


def chat_prompt(tokenizer, grid=TRAP):
    return tokenizer.apply_chat_template(render_messages(grid), tokenize=False, add_generation_prompt=True)


# --- reward_func file ----------------------------------------------------------------------------


@pytest.fixture
def file_executor(monkeypatch):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    monkeypatch.delenv("OPENRLHF_PASSK_MAZE_MODE", raising=False)
    return SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))


def test_reward_file_through_executor_with_chat_template(file_executor, tokenizer):
    prompt = chat_prompt(tokenizer)
    assert "<answer>RRDDL</answer>" in prompt and "<|im_start|>assistant" in prompt
    good = run_executor(file_executor, tokenizer, prompt, GOOD)
    bad = run_executor(file_executor, tokenizer, prompt, BAD)
    assert good["reward"].tolist() == [1.0] and good["scores"].tolist() == [1.0]
    assert bad["reward"].tolist() == [0.0]  # the prompt's example answer is not scored
    assert good["extra_logs"]["maze_format_ok"].tolist() == [1.0]
    assert bad["extra_logs"]["maze_format_ok"].tolist() == [0.0]


def test_reward_file_through_executor_without_chat_template(file_executor, tokenizer):
    prompt = render_prompt(TRAP) + "\n"
    assert run_executor(file_executor, tokenizer, prompt, GOOD)["reward"].tolist() == [1.0]
    assert run_executor(file_executor, tokenizer, prompt, BAD)["reward"].tolist() == [0.0]


def test_reward_func_cuts_the_prompt_even_when_it_does_not_round_trip(file_executor, tokenizer):
    reward_func = file_executor.reward_func
    chat = chat_prompt(tokenizer)
    # Prompt text that is not found in the query: fall back to the last assistant marker.
    out = reward_func(["<s>" + chat + BAD], ["something else"], [TRAP])
    assert out["rewards"].tolist() == [0.0]
    # No prompt, no marker: cut after the grid (our prompt ends with it).
    assert reward_func([render_prompt(TRAP) + BAD], [""], [TRAP])["rewards"].tolist() == [0.0]
    assert reward_func([render_prompt(TRAP) + GOOD], [""], [TRAP])["rewards"].tolist() == [1.0]
    # OpenRLHF's own batching helper (to_thread, lists of length 1).
    rows = asyncio.run(
        file_executor._fetch_rewards_via_func([chat + GOOD, chat + BAD], [chat, chat], [TRAP, TRAP])
    )
    assert [r["rewards"].tolist() for r in rows] == [[1.0], [0.0]]


def test_reward_func_rejects_bad_labels_loudly(file_executor, tokenizer, caplog):
    with pytest.raises(ValueError, match=r"labels\[0\] is not a maze grid.*exactly one 'S'"):
        file_executor.reward_func(["q"], ["p"], ["..E"])
    assert any(r.levelname == "ERROR" and "labels[0]" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="same length"):
        file_executor.reward_func(["q", "q"], ["p"], [TRAP])
    # OpenRLHF alone logs the error at INFO and leaves the reward empty; our hook stops the run instead.
    with pytest.raises(RuntimeError, match=r"reward file .*maze\.py failed for a sample: ValueError: labels\[0\]"):
        run_executor(file_executor, tokenizer, chat_prompt(tokenizer), GOOD, label="not a maze")


def test_reward_file_reference_mode(monkeypatch, tokenizer):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    monkeypatch.setenv("OPENRLHF_PASSK_MAZE_MODE", "reference")
    executor = SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
    prompt = chat_prompt(tokenizer)
    # No tags: the public verifier walks the letters of "rrddl" (strict mode gives 0).
    assert run_executor(executor, tokenizer, prompt, "rrddl")["reward"].tolist() == [1.0]
    monkeypatch.setenv("OPENRLHF_PASSK_MAZE_MODE", "loose")
    with pytest.raises(ValueError, match="OPENRLHF_PASSK_MAZE_MODE"):
        SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))


# --- HTTP server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real `openrlhf-passk serve-reward` (uvicorn, 2 workers) on a free loopback port."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OPENRLHF_PASSK_REWARD_TOKEN", None)
    log = tmp_path_factory.mktemp("reward-server") / "server.log"
    flags = ("--task", "maze", "--workers", "2", "--token", TOKEN, "--max-body-bytes", "65536")
    with reward_server(*flags, log=log, env=env) as (_, base, _port):
        yield base


def test_http_through_openrlhf_client(server, tokenizer):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=f"{server}/?token={TOKEN}")
    prompt = chat_prompt(tokenizer)
    good = run_executor(executor, tokenizer, prompt, GOOD)
    bad = run_executor(executor, tokenizer, prompt, BAD)
    assert good["reward"] == [1.0] and good["scores"] == [1.0]
    assert good["extra_logs"] == {"maze_format_ok": [1.0], "maze_strict": [1.0], "maze_reference": [1.0]}
    assert bad["reward"] == [0.0]
    # The HTTP helper directly, with a batch.
    chat = prompt
    rows = asyncio.run(
        executor._fetch_rewards_via_http([chat + GOOD, chat + BAD], [chat, chat], [TRAP, TRAP])
    )
    assert rows[0]["rewards"] == [1.0, 0.0]


def test_http_concurrent_requests_across_workers(server):
    import aiohttp

    prompt = render_prompt(TRAP)

    async def main():
        async with aiohttp.ClientSession() as session:

            async def one(i):
                response = GOOD if i % 3 else BAD
                payload = {"query": [prompt + response], "prompts": [prompt], "labels": [TRAP]}
                async with session.post(f"{server}/?token={TOKEN}", json=payload) as r:
                    assert r.status == 200
                    return (await r.json())["rewards"][0], float(i % 3 != 0)

            return await asyncio.gather(*(one(i) for i in range(150)))

    results = asyncio.run(main())
    assert all(got == want for got, want in results)
    time.sleep(1.3)  # workers flush their counters to the shared folder every second
    metrics = httpx.get(server + "/metrics").text
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    assert float(values["openrlhf_passk_reward_requests_total"]) >= 150
    assert float(values["openrlhf_passk_reward_sum_total"]) >= 100


VALID = {"query": ["q <answer>RRDDL</answer>"], "prompts": ["q"], "labels": [TRAP]}


@pytest.mark.parametrize(
    "path,kwargs,status,message",
    [
        ("/", {"json": VALID}, 401, "token"),
        ("/?token=wrong", {"json": VALID}, 401, "token"),
        ("/?token=" + TOKEN, {"content": b"{not json"}, 400, "not valid JSON"),
        ("/?token=" + TOKEN, {"content": b"\xff\xfe\x00"}, 400, "not valid JSON"),
        ("/?token=" + TOKEN, {"json": [1, 2]}, 422, "JSON object"),
        ("/?token=" + TOKEN, {"content": b"[" * 60000}, 400, "RecursionError"),
        ("/?token=" + TOKEN, {"json": {"query": ["a"]}}, 422, "labels"),
        ("/?token=" + TOKEN, {"json": {**VALID, "prompts": ["a", "b"]}}, 422, "same length"),
        ("/?token=" + TOKEN, {"json": {**VALID, "query": [7]}}, 422, "query[0] must be a string"),
        ("/?token=" + TOKEN, {"json": {**VALID, "labels": "S.E"}}, 422, "labels must be a list"),
        ("/?token=" + TOKEN, {"json": {**VALID, "labels": ["S.E\n.."]}}, 422, "labels[0] is not a maze grid"),
        ("/?token=" + TOKEN, {"json": {**VALID, "labels": [None]}}, 422, "labels[0] must be a string"),
        ("/?token=" + TOKEN, {"content": b"x" * 70000}, 413, "exceeds the limit"),
        ("/nowhere?token=" + TOKEN, {"json": VALID}, 404, "POST /"),
    ],
)
def test_http_bad_requests_get_4xx_json(server, path, kwargs, status, message):
    r = httpx.post(server + path, timeout=10, **kwargs)
    assert r.status_code == status and message in r.json()["error"]


def test_http_streamed_body_over_limit_and_auth_header(server):
    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"x" * 4096

    r = httpx.post(f"{server}/?token={TOKEN}", content=chunks(), timeout=10)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    ok = httpx.post(server + "/reward", json=VALID, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["rewards"] == [1.0]
    assert httpx.get(server + "/", timeout=10).status_code == 405
    # Still healthy after all the bad input, and the errors were counted by kind.
    assert httpx.get(server + "/health", timeout=10).json()["status"] == "ok"
    time.sleep(1.3)
    assert 'errors_total{kind="too_large"}' in httpx.get(server + "/metrics", timeout=10).text


def test_serve_reward_rejects_bad_options(subprocess_env):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openrlhf_passk.cli",
            "serve-reward",
            "--workers",
            "0",
            "--max-body-bytes",
            "5",
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--workers" in out.stderr and "--max-body-bytes" in out.stderr
    assert "Traceback" not in out.stderr


def test_server_and_generator_need_no_torch(subprocess_env):
    # The reward image installs the package without torch (see docker/reward.Dockerfile).
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from openrlhf_passk.rewards.server import create_app\n"
        "from openrlhf_passk.rewards.maze import score_batch\n"
        "import openrlhf_passk.tasks.maze_cli\n"
        "create_app()\n"
        f"print(score_batch(['<answer>RRDDL</answer>'], [''], [{TRAP!r}])[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0]"
