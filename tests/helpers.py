"""Helpers shared by the tests and the benchmarks: free loopback ports; a reward server process that is
started, waited for until /health answers 200 (failing with its log if it dies first), and stopped; and what
the multi-node tests share with their unit tests (the README's `ray start` lines, the RayJob rendering)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """`n` different TCP ports nothing listens on now (held open together while chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """A TCP port nothing listens on now (also the address of a server that is not there)."""
    return free_ports(1)[0]


@contextlib.contextmanager
def reward_server(
    *flags: str, log: Path, env: dict[str, str] | None = None, argv: list[str] | None = None, wait_s: float = 120
) -> Iterator[tuple[subprocess.Popen, str, int]]:
    """`openrlhf-passk serve-reward --host 127.0.0.1 --port P *flags` (or `argv`, whose --port/--host it sets),
    healthy; yields (process, base URL, port) and stops its whole process group afterwards. `wait_s` only
    turns a server that never comes up into a failure; the wait ends as soon as /health answers 200."""
    port = free_port()
    if argv is None:
        argv = [sys.executable, "-m", "openrlhf_passk.cli", "serve-reward", "--host", "127.0.0.1", "--port", str(port)]
    else:
        argv = list(argv)
        argv[argv.index("--host") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = str(port)
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*argv, *flags], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + wait_s
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"the reward server exited ({proc.returncode}):\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"the reward server was not healthy after {wait_s:g} s:\n{log.read_text()}")
                time.sleep(0.2)
            yield proc, base, port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # our own child's process group (uvicorn and its workers)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# ---- the multi-node tests (tests/test_multinode_ray.py) and their unit tests (tests/test_multinode.py) ----------
def readme_ray_start() -> tuple[list[str], list[str]]:
    """The head's and the other nodes' `ray start` lines of the README's "Multi-node without Kubernetes"."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^### Multi-node without Kubernetes.*?(?=^### )", text, re.S | re.M)
    assert match, "README.md has no '### Multi-node without Kubernetes' section"
    lines = [line.split("#", 1)[0].strip() for line in match.group(0).splitlines()]
    head = [shlex.split(line) for line in lines if line.startswith("ray start --head")]
    other = [shlex.split(line) for line in lines if line.startswith("ray start --address")]
    assert len(head) == 1 and len(other) == 1, "the README section must show one `ray start --head` and one --address"
    return head[0], other[0]


# The RayJob the multi-node tests submit, and its recipe sizes for 2 nodes x 1 logical GPU on CPU: 2 prompts x 4
# samples a step, 16 new tokens, a checkpoint every step.
RAYJOB = "passk-maze-2x8"
RAYJOB_SIZES = {
    "N_SAMPLES": "4", "PASSK_K": "2", "ROLLOUT_BATCH_SIZE": "2", "MICRO_ROLLOUT_BATCH_SIZE": "4",
    "TRAIN_BATCH_SIZE": "8", "MICRO_TRAIN_BATCH_SIZE": "2", "MAX_LEN": "1024", "MAX_NEW_TOKENS": "16",
    "SAVE_STEPS": "1",
}  # fmt: skip


def rayjob_render_flags(model: str, data_dir: str, runs_dir: str, reward_url: str) -> list[str]:
    """`scripts/render_k8s.py` flags for the RayJob's entrypoint on this machine: every override the multi-node
    tests make, each through one of render_k8s's switches."""
    flags = ["--entrypoint-of", RAYJOB, "--cpu-mode", "--gpus-per-node", "1", "--model", model]
    flags += ["--data-dir", data_dir, "--runs-dir", runs_dir, "--reward-url", reward_url]
    return flags + [f"--size={name}={value}" for name, value in RAYJOB_SIZES.items()]
