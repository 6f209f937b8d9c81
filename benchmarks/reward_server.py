"""Reward server benchmark: requests/s and latency as OpenRLHF sends them, plus a bad-input soak.

The server (`openrlhf-passk serve-reward`) runs in its own process on loopback; this process is the
client (aiohttp, one sample per POST, like `SingleTurnAgentExecutor._fetch_rewards_via_http`).
Two client styles: "openrlhf" opens a new ClientSession (so a new connection) per request, exactly as
OpenRLHF 0.11.2 does; "keepalive" reuses one session. The in-process `reward_func` rate is the
baseline. Every loop is bounded by a request count or a deadline.

    python benchmarks/reward_server.py --workers 2 --requests 3000 --soak-seconds 10
"""

import argparse
import asyncio
import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from openrlhf_passk.tasks.maze import generate, render_prompt

REPO = Path(__file__).resolve().parent.parent


def samples(n: int, seed: int = 0) -> list[tuple[dict, float]]:
    """Realistic single-sample payloads (ChatML query with reasoning) and the reward each must get."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        m = generate(rng.choice((9, 11, 13, 15)), i)
        prompt = f"<|im_start|>user\n{render_prompt(m.grid)}<|im_end|>\n<|im_start|>assistant\n"
        good = i % 2 == 0
        path = m.solution if good else m.solution[:-1] + ("U" if m.solution[-1] != "U" else "D")
        reasoning = "Let me trace the corridors from S step by step. " * 8
        query = f"{prompt}{reasoning}<answer>{path}</answer><|im_end|>"
        # The wrong variant swaps the last move, so it ends on a different cell than E.
        out.append(({"query": [query], "prompts": [prompt], "labels": [m.grid]}, 1.0 if good else 0.0))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def load(url: str, payloads, concurrency: int, total: int, style: str) -> dict:
    latencies: list[float] = []
    errors = 0
    issued = 0
    shared = (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
        if style == "keepalive"
        else None
    )
    timeout = aiohttp.ClientTimeout(total=180)

    async def post(session, payload):
        async with session.post(url, json=payload) as r:
            r.raise_for_status()
            return await r.json()

    async def client():
        nonlocal issued, errors
        while issued < total:
            payload, want = payloads[issued % len(payloads)]
            issued += 1
            t0 = time.perf_counter()
            try:
                if shared is not None:
                    body = await post(shared, payload)
                else:  # as OpenRLHF: a new session (and connection) per request
                    async with aiohttp.ClientSession(timeout=timeout) as session:
                        body = await post(session, payload)
                ok = body["rewards"] == [want]
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError):
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    if shared is not None:
        await shared.close()
    return {
        "n": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50": 1000 * percentile(latencies, 0.5),
        "p99": 1000 * percentile(latencies, 0.99),
        "errors": errors,
    }


def bad_requests(payload: dict, max_body: int) -> list[tuple[str, bytes | None, dict]]:
    """(path, raw body, json) triples of hostile or broken input; `raw body` wins when set."""
    good = payload
    return [
        ("/", b"{not json", {}),
        ("/", b"", {}),
        ("/", b"\xff\xfe\x00garbage", {}),
        ("/", b"[" * 50000, {}),
        ("/", b"1" * 5000, {}),
        ("/", b"x" * (max_body + 1), {}),
        ("/", None, {"json": [1, 2, 3]}),
        ("/", None, {"json": {"query": "not a list", "labels": []}}),
        ("/", None, {"json": {**good, "labels": ["S.E\n..", "x"]}}),
        ("/", None, {"json": {**good, "labels": ["**\n**"]}}),
        ("/", None, {"json": {**good, "query": [None]}}),
        ("/", None, {"json": {**good, "prompts": []}}),
        ("/", None, {"json": {**good, "query": ["<answer>" * 20000]}}),
        ("/does-not-exist", None, {"json": good}),
    ]


async def soak(base: str, payload: dict, max_body: int, seconds: float, max_requests: int) -> dict:
    cases = bad_requests(payload, max_body)
    statuses: dict[str, int] = {}
    health_fail = 0
    health_checks = 0
    deadline = time.monotonic() + seconds
    sent = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def client(k):
            nonlocal sent
            while time.monotonic() < deadline and sent < max_requests:
                path, raw, kw = cases[sent % len(cases)]
                sent += 1
                try:
                    data = {"data": raw} if raw is not None else kw
                    async with session.post(base + path, **data) as r:
                        key = str(r.status)
                        await r.read()
                except aiohttp.ClientError as e:  # e.g. the server closing on an oversized upload
                    key = type(e).__name__
                statuses[key] = statuses.get(key, 0) + 1

        async def health():
            nonlocal health_fail, health_checks
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                health_checks += 1
                try:
                    async with session.get(base + "/health") as r:
                        health_fail += r.status != 200
                except aiohttp.ClientError:
                    health_fail += 1

        await asyncio.gather(health(), *(client(k) for k in range(16)))
        async with session.post(base + "/", json=payload) as r:
            still_ok = r.status == 200
    return {
        "sent": sent,
        "statuses": statuses,
        "health_checks": health_checks,
        "health_failures": health_fail,
        "valid_request_after": still_ok,
    }


def in_process_rate(payloads, seconds: float = 3.0) -> tuple[float, float]:
    spec = importlib.util.spec_from_file_location(
        "reward_func", REPO / "openrlhf_passk" / "rewards" / "maze.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rates = []
    for fn in (module.reward_func, module.score_batch):
        fn(payloads[0][0]["query"], payloads[0][0]["prompts"], payloads[0][0]["labels"])  # imports torch once
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            payload, _ = payloads[n % len(payloads)]
            fn(payload["query"], payload["prompts"], payload["labels"])
            n += 1
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def server_cpu(pid: int) -> float:
    """CPU seconds used so far by the server and its worker processes (Linux /proc)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--requests", type=int, default=3000, help="requests per (concurrency, style) run")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--styles", default="openrlhf,keepalive")
    p.add_argument("--soak-seconds", type=float, default=10.0)
    p.add_argument("--soak-max-requests", type=int, default=20000)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    args = p.parse_args()

    payloads = samples(200)
    reward_func_rate, score_batch_rate = in_process_rate(payloads)
    print(
        f"in-process baseline: reward_func {reward_func_rate:,.0f} calls/s, "
        f"score_batch {score_batch_rate:,.0f}/s"
    )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openrlhf_passk.cli",
            "serve-reward",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--workers",
            str(args.workers),
            "--max-body-bytes",
            str(args.max_body_bytes),
            "--log-level",
            "error",
        ],
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        time.sleep(1.0)  # let every worker finish its start-up self-check
        print(f"server: {args.workers} workers, loopback, {os.cpu_count()} CPUs on this machine (shared)")
        print("srv CPU / cli CPU: CPU milliseconds per request spent by the server processes / this client")
        print(
            f"{'style':<10} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'errors':>6} {'vs in-proc':>10} {'srv CPU':>8} {'cli CPU':>8}"
        )
        for style in args.styles.split(","):
            for c in (int(x) for x in args.concurrency.split(",")):
                n = args.requests if c > 1 else max(200, args.requests // 5)
                cpu0 = server_cpu(server.pid), time.process_time()
                r = asyncio.run(load(base + "/", payloads, c, n, style))
                srv_ms = 1000 * (server_cpu(server.pid) - cpu0[0]) / r["n"]
                cli_ms = 1000 * (time.process_time() - cpu0[1]) / r["n"]
                print(
                    f"{style:<10} {c:>7} {r['n']:>8} {r['rps']:>8.0f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
                    f"{r['errors']:>6} {r['rps'] / reward_func_rate:>10.3f} {srv_ms:>8.3f} {cli_ms:>8.3f}"
                )
        s = asyncio.run(
            soak(base, payloads[0][0], args.max_body_bytes, args.soak_seconds, args.soak_max_requests)
        )
        fives = sum(v for k, v in s["statuses"].items() if k.startswith("5"))
        print(
            f"soak: {s['sent']} bad requests in {args.soak_seconds:.0f}s, "
            f"statuses {s['statuses']}, 5xx {fives}, "
            f"health {s['health_checks'] - s['health_failures']}/{s['health_checks']} ok, "
            f"valid request afterwards ok: {s['valid_request_after']}, server alive: {server.poll() is None}"
        )
        return 0 if fives == 0 and s["health_failures"] == 0 and s["valid_request_after"] else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
