"""`openrlhf-passk serve-reward`: a task verifier behind OpenRLHF's HTTP reward protocol.

POST / (also /reward and /get_reward) with {"query": [...], "prompts": [...], "labels": [...]} returns
{"rewards": [...], "scores": [...], "extra_logs": {...}}. GET (or HEAD) /health answers once the worker
has passed a self-check (readiness); GET /metrics serves Prometheus counters summed over all workers.
Bad input gets a 4xx JSON {"error": ..., "kind": ...} naming the field or the limit and its flag; the
server never crashes on a request.

Every request's work is bounded: body bytes, samples per request, characters per query, label grid
size; scoring runs off the event loop (so /health answers during a large batch) under
--request-timeout (503 past it). Slow clients are cut off by --header-timeout and --body-timeout.

Auth: a token (--token-file, env OPENRLHF_PASSK_REWARD_TOKEN, or --token) is checked in an
`Authorization: Bearer` header, which our patch of OpenRLHF's client sends when the rollout workers
have OPENRLHF_PASSK_REWARD_TOKEN, or in `?token=` for clients without it. /health and /metrics stay
open for probes and scrapers.
"""

import argparse
import json
import os
import sys

from openrlhf_passk import env

TASKS = ("maze",)
TOKEN_ENV = env.REWARD_TOKEN
_CONFIG_ENV = env.SERVE_CONFIG  # settings handed to uvicorn's worker processes (JSON)
# The default limits keep the most expensive request they admit near one second of scoring on a loaded
# 2-core machine (benchmarks/reward_server.py), so even two at once on one worker answer within 5 s.
DEFAULTS = {
    "max_body_bytes": 4 * 1024 * 1024,
    "max_samples": 1024,
    "max_query_chars": 1024 * 1024,
    "max_grid": 101,
    "request_timeout": 30.0,
    "header_timeout": 10.0,
    "body_timeout": 30.0,
    "limit_concurrency": 2048,
}
# Bodies up to this size are scored on the event loop (a thread hop costs more than scoring them);
# larger ones in a thread, so one large batch cannot stall /health or the other requests.
_INLINE_BYTES = 16 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="maze", help="verifier to serve")
    parser.add_argument("--mode", choices=("strict", "reference"), default="strict", help="maze scoring mode")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for a pod)")
    parser.add_argument("--port", type=int, default=5000, help="port (0: any free port)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding the required token (e.g. a mounted Kubernetes Secret); clients send it as "
        f"'Authorization: Bearer' or ?token=. Without it: env {TOKEN_ENV}, else --token, else no auth",
    )
    parser.add_argument(
        "--token", default=None, help="required token on the command line (visible in `ps`: prefer --token-file)"
    )
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULTS["max_body_bytes"], help="request size limit")
    parser.add_argument(
        "--max-samples", type=int, default=DEFAULTS["max_samples"], help="samples per request (413 above)"
    )
    parser.add_argument(
        "--max-query-chars",
        type=int,
        default=DEFAULTS["max_query_chars"],
        help="characters per query (prompt + response) and per prompt (413 above)",
    )
    parser.add_argument(
        "--max-grid", type=int, default=DEFAULTS["max_grid"], help="largest label grid, rows and columns (422 above)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULTS["request_timeout"],
        help="seconds a request may spend waiting for and in scoring (503 past it)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULTS["header_timeout"],
        help="seconds a client has to send a request's headers (the connection is closed past it)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULTS["body_timeout"],
        help="seconds a client has to send a request's body (408 past it)",
    )
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=DEFAULTS["limit_concurrency"],
        help="connections + requests per worker; uvicorn answers 503 above it",
    )
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    parser.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )


def read_token(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(token or None for no auth, error message or None). Never puts the token in the message."""
    if args.token_file is not None and args.token is not None:
        return None, "pass --token-file or --token, not both"
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            return None, f"--token-file {args.token_file}: cannot read it ({type(e).__name__}: {e.strerror or e})"
        if not token:
            return None, f"--token-file {args.token_file} is empty: write the token into it"
        return token, None
    if args.token is not None:
        if not args.token.strip():
            return None, "--token must not be empty (leave it out, and unset the variable, to disable auth)"
        return args.token.strip(), None
    if TOKEN_ENV in os.environ:
        token = os.environ[TOKEN_ENV].strip()
        if not token:
            return None, f"{TOKEN_ENV} is set but empty: set it to the token, or unset it to disable auth"
        return token, None
    return None, None


def listening_filter(level: str = "warning"):
    """logging filter for uvicorn's error logger: records at `level` and above, plus uvicorn's one
    INFO line naming the bound address, reworded as "listening on http://HOST:PORT"."""
    import logging

    threshold = logging.getLevelName(level.upper())

    def keep(record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Uvicorn running on"):
            record.msg = record.msg.replace("Uvicorn running on", "listening on").replace(" (Press CTRL+C to quit)", "")
            record.__dict__.pop("color_message", None)
            return True
        return record.levelno >= threshold

    return keep


def run(args: argparse.Namespace) -> int:
    import copy
    import shutil
    import tempfile

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from openrlhf_passk.rewards.protocol import HEADER_TIMEOUT_ENV, HeaderTimeoutProtocol

    problems = []
    if not 1 <= args.workers <= 64:
        problems.append(f"--workers must be from 1 to 64, got {args.workers}")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_body_bytes < 1024:
        problems.append(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    for flag, value, low in (
        ("--max-samples", args.max_samples, 1),
        ("--max-query-chars", args.max_query_chars, 64),
        ("--max-grid", args.max_grid, 5),
        ("--limit-concurrency", args.limit_concurrency, 1),
    ):
        if value < low:
            problems.append(f"{flag} must be at least {low}, got {value}")
    for flag, value in (
        ("--request-timeout", args.request_timeout),
        ("--header-timeout", args.header_timeout),
        ("--body-timeout", args.body_timeout),
    ):
        if not value > 0:
            problems.append(f"{flag} must be a positive number of seconds, got {value}")
    token, token_problem = read_token(args)
    if token_problem:
        problems.append(token_problem)
    if problems:
        print("openrlhf-passk serve-reward: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.token is not None:
        print(
            "openrlhf-passk serve-reward: warning: --token is visible to every user of this machine (ps); "
            f"prefer --token-file or env {TOKEN_ENV}",
            file=sys.stderr,
        )

    # Workers are separate processes: they read their settings from the environment and write their
    # counters to files in a shared folder, which /metrics sums. One worker keeps them in memory (and
    # uvicorn then re-raises SIGTERM after shutdown, so no cleanup code would run).
    metrics_dir = tempfile.mkdtemp(prefix="openrlhf-passk-metrics-") if args.workers > 1 else ""
    settings = {name: getattr(args, name) for name in DEFAULTS}
    settings.update(task=args.task, mode=args.mode, token=token, metrics_dir=metrics_dir, docs=args.docs)
    os.environ[_CONFIG_ENV] = json.dumps(settings)
    os.environ[HEADER_TIMEOUT_ENV] = str(args.header_timeout)
    # uvicorn logs its bound address at INFO; at our default level (warning) keep just that line.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["filters"] = {
        "listening": {"()": "openrlhf_passk.rewards.server.listening_filter", "level": args.log_level}
    }
    log_config["loggers"]["uvicorn.error"] = {"level": "DEBUG", "filters": ["listening"]}
    log_config["loggers"]["uvicorn.access"] = {"handlers": [], "level": "CRITICAL", "propagate": False}
    log_config["loggers"]["openrlhf_passk"] = {
        "handlers": ["default"],
        "level": args.log_level.upper(),
        "propagate": False,
    }
    try:
        uvicorn.run(
            "openrlhf_passk.rewards.server:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            http=HeaderTimeoutProtocol,
            log_config=log_config,
            access_log=False,  # a token may ride in the URL (?token=); keep it out of logs
            limit_concurrency=args.limit_concurrency,
            timeout_graceful_shutdown=5,
        )
    except SystemExit as e:  # uvicorn exits 3 when it cannot start (e.g. the port is taken): a runtime error
        if e.code not in (0, None):
            message = f"the server could not run (uvicorn exit {e.code}, see above)"
            print(f"openrlhf-passk serve-reward: error: {message}", file=sys.stderr)
            return 1
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def app_from_env():
    """uvicorn factory for worker processes (settings come from `run` through the environment)."""
    settings = json.loads(os.environ.get(_CONFIG_ENV, "{}"))
    settings["metrics_dir"] = settings.get("metrics_dir") or None
    return create_app(**settings)


def create_app(
    task: str = "maze",
    mode: str = "strict",
    token: str | None = None,
    metrics_dir: str | None = None,
    docs: bool = False,
    max_body_bytes: int = DEFAULTS["max_body_bytes"],
    max_samples: int = DEFAULTS["max_samples"],
    max_query_chars: int = DEFAULTS["max_query_chars"],
    max_grid: int = DEFAULTS["max_grid"],
    request_timeout: float = DEFAULTS["request_timeout"],
    body_timeout: float = DEFAULTS["body_timeout"],
    **_uvicorn_only,  # header_timeout, limit_concurrency: applied by uvicorn, not the app
):
    """The FastAPI app of one worker."""
    import asyncio
    import contextlib
    import hmac
    import logging
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.routing import Route

    from openrlhf_passk.rewards.maze import score_batch
    from openrlhf_passk.tasks.maze import generate

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    logger = logging.getLogger("openrlhf_passk.rewards.server")
    counters: Counter[str] = Counter()
    state = {"dirty": False, "ready": False}
    # Two threads: one large batch does not queue every other large one behind it. Scoring is pure
    # Python, so the event loop still gets the GIL every few ms and /health keeps answering.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="score")

    class Rejected(Exception):
        """A request answered with a 4xx: (status, kind, message)."""

    def flush() -> None:
        if metrics_dir:
            path = os.path.join(metrics_dir, f"{os.getpid()}.json")
            try:
                with open(path + ".tmp", "w") as f:
                    json.dump(counters, f)
                os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file
            except OSError as e:  # metrics must never take the reward path down
                logger.warning("cannot write metrics to %s: %s", metrics_dir, e)
        state["dirty"] = False

    def count(name: str, value: float = 1.0) -> None:
        counters[name] += value
        state["dirty"] = True

    def error(status: int, kind: str, message: str, close: bool = False) -> JSONResponse:
        count(f'openrlhf_passk_reward_errors_total{{kind="{kind}"}}')
        headers = {"connection": "close"} if close else None
        return JSONResponse({"error": message, "kind": kind}, status_code=status, headers=headers)

    def score_body(raw: bytes) -> tuple[list[float], dict]:
        """Parse, bound and score one request body (on the event loop or in the pool); Rejected if bad."""
        try:
            data = json.loads(raw)
        except RecursionError:
            raise Rejected(400, "bad_json", "body is not valid JSON: RecursionError: nested too deeply") from None
        except ValueError as e:
            raise Rejected(400, "bad_json", f"body is not valid JSON: {type(e).__name__}: {e}"[:300]) from None
        if not isinstance(data, dict):
            raise Rejected(
                422, "bad_request", 'body must be a JSON object {"query": [...], "prompts": [...], "labels": [...]}'
            )
        missing = [k for k in ("query", "labels") if k not in data]
        if missing:
            raise Rejected(422, "bad_request", f"missing field(s) {missing}: send query, prompts and labels lists")
        queries, prompts, labels = data["query"], data.get("prompts"), data["labels"]
        for name, values in (("query", queries), ("prompts", prompts), ("labels", labels)):
            if isinstance(values, list) and len(values) > max_samples:
                raise Rejected(
                    413,
                    "too_many_samples",
                    f"{name} has {len(values)} samples, over the limit of {max_samples} per request "
                    "(serve-reward --max-samples)",
                )
        for name, values in (("query", queries), ("prompts", prompts)):
            for i, v in enumerate(values if isinstance(values, list) else ()):
                if isinstance(v, str) and len(v) > max_query_chars:
                    raise Rejected(
                        413,
                        "query_too_long",
                        f"{name}[{i}] has {len(v)} characters, over the limit of {max_query_chars} "
                        "(serve-reward --max-query-chars)",
                    )
        try:
            return score_batch(queries, prompts, labels, mode, max_grid=max_grid)
        except ValueError as e:
            raise Rejected(422, "bad_label" if str(e).startswith("labels[") else "bad_request", str(e)) from None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Readiness: only answer /health after the verifier solved a known maze in this process.
        maze = generate(9, 0)
        rewards, _ = score_batch([f"<answer>{maze.solution}</answer>"], [""], [maze.grid], mode)
        if rewards != [1.0]:
            raise RuntimeError("maze verifier self-check failed")
        state["ready"] = True

        async def flusher():
            while True:
                await asyncio.sleep(1.0)
                if state["dirty"]:
                    flush()

        task_ = asyncio.create_task(flusher())
        yield
        task_.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        flush()

    app = FastAPI(
        title="openrlhf-passk reward server",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error(exc.status_code, kind, f"{exc.detail} ({request.method} {request.url.path}); use POST /")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal", f"internal error: {type(exc).__name__}")

    async def health(request: Request):
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", "task": task, "mode": mode, "pid": os.getpid()})

    async def metrics(request: Request):
        flush()
        total: Counter[str] = Counter()
        if metrics_dir:
            for name in os.listdir(metrics_dir):
                if name.endswith(".json"):
                    with contextlib.suppress(OSError, ValueError):
                        with open(os.path.join(metrics_dir, name)) as f:
                            total.update(json.load(f))
        else:
            total.update(counters)
        lines = [
            "# TYPE openrlhf_passk_reward_requests_total counter",
            "# TYPE openrlhf_passk_reward_samples_total counter",
            "# TYPE openrlhf_passk_reward_sum_total counter",
            "# TYPE openrlhf_passk_reward_errors_total counter",
        ]
        for name in ("requests_total", "samples_total", "sum_total"):
            lines.append(f"openrlhf_passk_reward_{name} {total.get('openrlhf_passk_reward_' + name, 0.0)}")
        lines += [
            f"{k} {v}" for k, v in sorted(total.items()) if k.startswith("openrlhf_passk_reward_errors")
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Rejected(400, "bad_request", f"invalid Content-Length header {declared[:40]!r}")
            if int(declared) > max_body_bytes:
                raise Rejected(
                    413,
                    "too_large",
                    f"body of {declared} bytes exceeds the limit of {max_body_bytes} (serve-reward --max-body-bytes)",
                )
        chunks, size = [], 0
        try:
            async with asyncio.timeout(body_timeout):
                async for chunk in request.stream():  # also enforced while streaming (chunked bodies)
                    size += len(chunk)
                    if size > max_body_bytes:
                        raise Rejected(
                            413,
                            "too_large",
                            f"body exceeds the limit of {max_body_bytes} bytes (serve-reward --max-body-bytes)",
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise Rejected(
                408, "body_timeout", f"body not received within {body_timeout:g} s (serve-reward --body-timeout)"
            ) from None
        return b"".join(chunks)

    async def reward(request: Request):
        count("openrlhf_passk_reward_requests_total")
        if token is not None:
            header = request.headers.get("authorization", "")
            candidates = [header[7:].strip()] if header[:7].lower() == "bearer " else []
            candidates.append(request.query_params.get("token", ""))
            if not any(hmac.compare_digest(c.encode(), token.encode()) for c in candidates):
                return error(
                    401,
                    "unauthorized",
                    "missing or wrong token: send 'Authorization: Bearer <token>' (set "
                    f"{TOKEN_ENV} where OpenRLHF's rollout workers run) or ?token=",
                )
        try:
            raw = await read_body(request)
            if len(raw) <= _INLINE_BYTES:
                rewards, logs = score_body(raw)
            else:
                loop = asyncio.get_running_loop()
                # Past the timeout the request gets its 503; a batch already scoring finishes in its
                # thread (its work is bounded by the limits above), a queued one is dropped.
                rewards, logs = await asyncio.wait_for(loop.run_in_executor(pool, score_body, raw), request_timeout)
        except Rejected as r:
            status, kind, message = r.args
            return error(status, kind, message, close=status in (408, 413))
        except ClientDisconnect:
            # The client hung up mid-body: nobody is left to answer. Not a server error.
            count('openrlhf_passk_reward_errors_total{kind="client_disconnect"}')
            logger.debug("client %s disconnected before sending its whole body", request.client)
            return Response(status_code=400)
        except TimeoutError:
            return error(
                503,
                "timeout",
                f"scoring did not finish within {request_timeout:g} s (serve-reward --request-timeout); "
                "send fewer or shorter samples per request",
            )
        count("openrlhf_passk_reward_samples_total", float(len(rewards)))
        count("openrlhf_passk_reward_sum_total", sum(rewards))
        body = json.dumps({"rewards": rewards, "scores": rewards, "extra_logs": logs})
        return Response(body, media_type="application/json")

    # Plain Starlette routes: the handler parses its own body, and skipping FastAPI's dependency
    # resolution saves CPU on the hot path (one tiny request per sample). A GET route answers HEAD too.
    app.router.routes.append(Route("/health", health, methods=["GET"]))
    app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))
    for path in ("/", "/reward", "/get_reward"):
        app.router.routes.append(Route(path, reward, methods=["POST"]))
    return app
