"""Reward server benchmark: requests/s and latency as OpenRLHF sends them, a bad-input soak, and the
hostile inputs (quadratic-stripping bodies, huge labels, clients that hang up or stall), each timed alone
while /health is probed.

The server (`openrlhf-passk serve-reward`) runs in its own process on loopback; this process is the
client (aiohttp, one sample per POST, like `SingleTurnAgentExecutor._fetch_rewards_via_http`).
Two client styles: "openrlhf" opens a new ClientSession (so a new connection) per request, exactly as
OpenRLHF 0.11.2 does; "keepalive" reuses one session. The in-process `reward_func` rate is the
baseline. Every loop is bounded by a request count or a deadline.

    python benchmarks/reward_server.py --workers 2 --requests 3000 --soak-seconds 10
    python benchmarks/reward_server.py --workers 1 --skip-load     # soak + attacks only

Exit status 1 when a soak or attack request gets a 5xx it should not (only the request-timeout 503
is expected), /health fails, the server logs an internal error, or the worker dies.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from openrlhf_passk.tasks.maze import generate, render_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import reward_server  # noqa: E402  (the tests' helper: start, wait healthy, stop)

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
            except (TimeoutError, aiohttp.ClientError, KeyError):
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
        ("/", None, {"json": {**good, "query": ["</s>" * 20000]}}),
        ("/", None, {"json": {**good, "labels": ["S*E"]}}),  # unsolvable
        ("/", None, {"json": {**good, "labels": [open_grid(150)]}}),  # over --max-grid
        ("/", None, {"json": {"query": ["x"] * 1025, "prompts": [""] * 1025, "labels": ["SE"] * 1025}}),
        ("/does-not-exist", None, {"json": good}),
    ]


def open_grid(n: int) -> str:
    """An open n x n grid, S top left, E bottom right (valid, solvable, as large as asked)."""
    rows = ["." * n for _ in range(n)]
    rows[0], rows[-1] = "S" + rows[0][1:], rows[-1][:-1] + "E"
    return "\n".join(rows)


def attacks() -> list[tuple[str, dict]]:
    """Requests that once cost seconds each (the timings in the labels are from before the fixes) and the
    worst requests the default limits admit."""
    label = "..SE" + "." * 65532
    grid101 = open_grid(101)
    return [
        ("1. label recurs in query, 256 KiB (was 7.1 s)", {"query": [label + "." * 131072], "prompts": [""],
                                                          "labels": [label]}),
        ("1. same shape, 101x101 label, 1 MiB query", {"query": [grid101 * 100], "prompts": [""], "labels": [grid101]}),
        ("2. '</s>' x 262144, 1 MiB (was 16 s)", {"query": ["</s>" * 262144], "prompts": [""], "labels": ["S.E"]}),
        ("4. 2001x2001 label (was 4.6 s CPU)", {"query": ["x"], "prompts": [""], "labels": [open_grid(2001)]}),
        ("7. unsolvable label", {"query": ["<answer>RR</answer>"], "prompts": [""], "labels": ["S*E"]}),
        ("limit: 1025 samples", {"query": ["x"] * 1025, "prompts": [""] * 1025, "labels": ["SE"] * 1025}),
        # Each query just under --max-query-chars (1 Mi), walked move by move in both modes.
        ("limit: 3 queries of 1 Mi moves (3 MiB)", {"query": ["<answer>" + "RL" * 524275 + "</answer>"] * 3,
                                                    "prompts": [""] * 3, "labels": ["S.E"] * 3}),
        ("limit: 350 samples, 101x101 labels", {"query": ["<answer>R</answer>"] * 350, "prompts": [""] * 350,
                                                "labels": [grid101] * 350}),
        ("limit: body over --max-body-bytes (4 MiB)", {"query": ["x" * (4 << 20)], "prompts": [""], "labels": ["SE"]}),
    ]


async def timed_post(session, url: str, body: bytes) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            status = str(r.status)
    except (TimeoutError, aiohttp.ClientError) as e:
        status = type(e).__name__
    return status, time.perf_counter() - t0


async def slow_client(port: int, head: bytes, body: bytes = b"") -> tuple[str, float]:
    """Send a request's start, then nothing: (what the server did, after how many seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(head + body)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(), timeout=120)
        outcome = data.split(b"\r\n", 1)[0].decode() if data else "closed"
    except (TimeoutError, ConnectionError) as e:
        outcome = type(e).__name__
    writer.close()
    return outcome, time.perf_counter() - t0


async def hang_up_mid_body(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"query": ["')
    await writer.drain()
    writer.close()


async def attack(base: str, port: int, worker_pids) -> dict:
    """Each attack alone (latency, status), then 2 of the heaviest at once, then 1,500 hang-ups and 50
    slow clients; /health is probed every 0.25 s throughout."""
    rows = []
    health = {"n": 0, "fail": 0, "max": 0.0}
    stop = asyncio.Event()
    pids_before = worker_pids()
    pids: set[int] = set()  # processes that answered /health: with one worker, a restart shows here
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def probe():
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                        ok = r.status == 200
                        pids.add((await r.json())["pid"])
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                health["n"] += 1
                health["fail"] += not ok
                health["max"] = max(health["max"], time.perf_counter() - t0)
                await asyncio.sleep(0.25)

        prober = asyncio.create_task(probe())
        for name, payload in attacks():
            body = json.dumps(payload).encode()
            status, took = await timed_post(session, base + "/", body)
            rows.append((name, f"{len(body) / 2**20:.2f} MiB", status, took))
        heavy = json.dumps(attacks()[6][1]).encode()
        both = await asyncio.gather(*(timed_post(session, base + "/", heavy) for _ in range(2)))
        rows.append(("2 of the 3 MiB batches at once", "2 x 3.00 MiB", "/".join(s for s, _ in both),
                     max(t for _, t in both)))
        t0 = time.perf_counter()
        for _ in range(15):
            await asyncio.gather(*(hang_up_mid_body(port) for _ in range(100)))
        rows.append(("3. 1,500 clients hang up mid-body", "-", "no response", time.perf_counter() - t0))
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        slow = await asyncio.gather(
            *(slow_client(port, b"POST / HTTP/1.1\r\nHost: x\r\n") for _ in range(25)),
            *(slow_client(port, head, b'{"query": [') for _ in range(25)),
        )
        for label, group in (("7. 25 slowloris (headers never end)", slow[:25]), ("7. 25 slow bodies", slow[25:])):
            outcomes = sorted({o for o, _ in group})
            rows.append((label, "-", ",".join(outcomes), max(t for _, t in group)))
        async with session.head(base + "/health") as r:
            rows.append(("7. HEAD /health", "-", str(r.status), 0.0))
        async with session.get(base + "/openapi.json") as r:
            rows.append(("7. GET /openapi.json", "-", str(r.status), 0.0))
        await asyncio.sleep(1.5)  # counters reach /metrics within a second
        stop.set()
        await prober
        async with session.get(base + "/metrics") as r:
            metrics = await r.text()
    same = worker_pids() == pids_before and len(pids) <= max(1, len(pids_before))
    return {"rows": rows, "health": health, "metrics": metrics, "same_workers": same, "pids": sorted(pids)}


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
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="the server's (default 4 MiB)")
    p.add_argument("--skip-load", action="store_true", help="skip the req/s table: soak and attacks only")
    p.add_argument("--skip-attacks", action="store_true")
    args = p.parse_args()

    payloads = samples(200)
    reward_func_rate = 0.0
    if not args.skip_load:
        reward_func_rate, score_batch_rate = in_process_rate(payloads)
        print(
            f"in-process baseline: reward_func {reward_func_rate:,.0f} calls/s, "
            f"score_batch {score_batch_rate:,.0f}/s"
        )

    log_path = Path(tempfile.mkdtemp(prefix="reward-server-")) / "server.log"
    # Shorter client timeouts than the defaults (10 s headers, 30 s body), so the slow-client attacks
    # finish quickly; every other setting is the default.
    flags = ["--workers", str(args.workers), "--max-body-bytes", str(args.max_body_bytes)]
    flags += ["--header-timeout", "5", "--body-timeout", "5"]
    with reward_server(*flags, log=log_path) as (server, base, port):
        time.sleep(1.0)  # /health answers from the first worker up: let every worker finish its self-check
        return _run(args, payloads, reward_func_rate, server, base, port, log_path)


def _run(args, payloads, reward_func_rate: float, server, base: str, port: int, log_path: Path) -> int:
    """The measurements against the running server: load, soak, attacks. 0 when every check held."""
    print(f"server: {args.workers} workers, loopback, {os.cpu_count()} CPUs on this machine (shared)")
    styles = [] if args.skip_load else args.styles.split(",")
    if styles:
        print("srv CPU / cli CPU: CPU milliseconds per request spent by the server processes / this client")
        print(
            f"{'style':<10} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'errors':>6} {'vs in-proc':>10} {'srv CPU':>8} {'cli CPU':>8}"
        )
    for style in styles:
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
    ok = fives == 0 and s["health_failures"] == 0 and s["valid_request_after"]
    if not args.skip_attacks:
        import psutil

        def worker_pids():
            return sorted(p.pid for p in psutil.Process(server.pid).children(recursive=True))

        a = asyncio.run(attack(base, port, worker_pids))
        print(f"attacks ({args.workers} worker(s); --header-timeout 5 --body-timeout 5, other limits default):")
        print(f"{'attack':<48} {'body':>12} {'status':>24} {'seconds':>8}")
        for name, size, status, took in a["rows"]:
            print(f"{name:<48} {size:>12} {status:>24} {took:>8.2f}")
        errors = {
            line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
            for line in a["metrics"].splitlines()
            if line.startswith("openrlhf_passk_reward_errors_total{")
        }
        text = log_path.read_text()
        h = a["health"]
        print(
            f"/health during the attacks: {h['n'] - h['fail']}/{h['n']} ok, slowest {h['max']:.2f} s; "
            f"errors by kind {errors}; server log {len(text)} bytes, tracebacks {text.count('Traceback')}; "
            f"same worker processes: {a['same_workers']} (/health answered from pids {a['pids']}); "
            f"server alive: {server.poll() is None}"
        )
        slow_attacks = [r for r in a["rows"] if r[3] > 5.0 and not r[0].startswith(("3.", "7. 25"))]
        bad_5xx = [r for r in a["rows"] if r[2].startswith("5")]
        ok = ok and not slow_attacks and not bad_5xx and h["fail"] == 0 and a["same_workers"]
        ok = ok and 'kind="internal"' not in a["metrics"] and "Traceback" not in text and server.poll() is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
