"""Helpers shared by the tests and the benchmarks: a free loopback port, and a reward server process that is
started, waited for until /health answers 200 (failing with its log if it dies first), and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now (also the address of a server that is not there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
