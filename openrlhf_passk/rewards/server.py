"""`openrlhf-passk serve-reward`: a task verifier behind OpenRLHF's HTTP reward protocol.

POST / (also /reward and /get_reward) with {"query": [...], "prompts": [...], "labels": [...]} returns
{"rewards": [...], "scores": [...], "extra_logs": {...}}. GET /health answers once the worker has
passed a self-check (readiness); GET /metrics serves Prometheus counters summed over all workers.
Bad input gets a 4xx JSON {"error": ...} naming the field; the server never crashes on a request.

OpenRLHF's client sends no headers, so a token (`--token` or env OPENRLHF_PASSK_REWARD_TOKEN) can be
given as `?token=...` in `--remote_rm_url` as well as an `Authorization: Bearer` header. /health and
/metrics stay open for probes and scrapers.
"""

import argparse
import os
import sys

TASKS = ("maze",)
_ENV = "OPENRLHF_PASSK_SERVE_"  # configuration handed to uvicorn's worker processes
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# Bodies above this are scored in a thread, so one huge request cannot stall the event loop.
_INLINE_BYTES = 64 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="maze", help="verifier to serve (default maze)")
    parser.add_argument("--mode", choices=("strict", "reference"), default="strict", help="maze scoring mode")
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for a pod)"
    )
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--token",
        default=os.environ.get("OPENRLHF_PASSK_REWARD_TOKEN") or None,  # set but empty: no auth
        help="required token (Bearer header or ?token=); default env OPENRLHF_PASSK_REWARD_TOKEN",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY,
        help=f"request size limit (default {DEFAULT_MAX_BODY})",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import uvicorn

    problems = []
    if not 1 <= args.workers <= 64:
        problems.append(f"--workers must be from 1 to 64, got {args.workers}")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_body_bytes < 1024:
        problems.append(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.token is not None and not args.token.strip():
        problems.append("--token must not be empty (leave it out to disable auth)")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2

    # Workers are separate processes: they read their settings from the environment and write their
    # counters to files in a shared folder, which /metrics sums. One worker keeps them in memory (and
    # uvicorn then re-raises SIGTERM after shutdown, so no cleanup code would run).
    metrics_dir = tempfile.mkdtemp(prefix="openrlhf-passk-metrics-") if args.workers > 1 else ""
    os.environ.update(
        {
            _ENV + "TASK": args.task,
            _ENV + "MODE": args.mode,
            _ENV + "MAX_BODY": str(args.max_body_bytes),
            _ENV + "METRICS_DIR": metrics_dir,
            _ENV + "TOKEN": args.token or "",
        }
    )
    try:
        uvicorn.run(
            "openrlhf_passk.rewards.server:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            access_log=False,  # the token may ride in the URL; keep it out of logs
            timeout_graceful_shutdown=5,
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def app_from_env():
    """uvicorn factory for worker processes (settings come from `run` through the environment)."""
    return create_app(
        task=os.environ.get(_ENV + "TASK", "maze"),
        mode=os.environ.get(_ENV + "MODE", "strict"),
        token=os.environ.get(_ENV + "TOKEN") or None,
        max_body_bytes=int(os.environ.get(_ENV + "MAX_BODY", DEFAULT_MAX_BODY)),
        metrics_dir=os.environ.get(_ENV + "METRICS_DIR") or None,
    )


def create_app(
    task: str = "maze",
    mode: str = "strict",
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    metrics_dir: str | None = None,
):
    """The FastAPI app of one worker."""
    import asyncio
    import contextlib
    import hmac
    import json
    import logging
    from collections import Counter

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    from openrlhf_passk.rewards.maze import score_batch
    from openrlhf_passk.tasks.maze import generate

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    logger = logging.getLogger("openrlhf_passk.rewards.server")
    counters: Counter[str] = Counter()
    state = {"dirty": False, "ready": False}

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

    def error(status: int, kind: str, message: str) -> JSONResponse:
        count(f'openrlhf_passk_reward_errors_total{{kind="{kind}"}}')
        return JSONResponse({"error": message, "kind": kind}, status_code=status)

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
        flush()

    app = FastAPI(title="openrlhf-passk reward server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error(exc.status_code, kind, f"{exc.detail} ({request.method} {request.url.path}); use POST /")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal", f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok", "task": task, "mode": mode, "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics():
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

    async def reward(request: Request):
        count("openrlhf_passk_reward_requests_total")
        if token is not None:
            header = request.headers.get("authorization", "")
            candidates = [header[7:].strip()] if header[:7].lower() == "bearer " else []
            candidates.append(request.query_params.get("token", ""))
            if not any(hmac.compare_digest(c.encode(), token.encode()) for c in candidates):
                return error(
                    401, "unauthorized", "missing or wrong token: send ?token=... or Authorization: Bearer"
                )

        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return error(400, "bad_request", f"invalid Content-Length header {declared!r}")
            if int(declared) > max_body_bytes:
                return error(
                    413, "too_large", f"body of {declared} bytes exceeds the limit of {max_body_bytes}"
                )
        chunks, size = [], 0
        async for chunk in request.stream():  # also enforced while streaming (chunked bodies)
            size += len(chunk)
            if size > max_body_bytes:
                return error(413, "too_large", f"body exceeds the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            return error(400, "bad_json", f"body is not valid JSON: {type(e).__name__}: {e}"[:300])
        if not isinstance(data, dict):
            return error(
                422,
                "bad_request",
                'body must be a JSON object {"query": [...], "prompts": [...], "labels": [...]}',
            )
        missing = [k for k in ("query", "labels") if k not in data]
        if missing:
            return error(
                422, "bad_request", f"missing field(s) {missing}: send query, prompts and labels lists"
            )
        args = (data["query"], data.get("prompts"), data["labels"], mode)
        try:
            if size > _INLINE_BYTES:
                rewards, logs = await asyncio.to_thread(score_batch, *args)
            else:
                rewards, logs = score_batch(*args)
        except ValueError as e:
            kind = "bad_label" if str(e).startswith("labels[") else "bad_request"
            return error(422, kind, str(e))
        count("openrlhf_passk_reward_samples_total", float(len(rewards)))
        count("openrlhf_passk_reward_sum_total", sum(rewards))
        body = json.dumps({"rewards": rewards, "scores": rewards, "extra_logs": logs})
        return Response(body, media_type="application/json")

    # Plain Starlette routes: the handler parses its own body, and skipping FastAPI's dependency
    # resolution saves CPU on the hot path (one tiny request per sample).
    for path in ("/", "/reward", "/get_reward"):
        app.router.routes.append(Route(path, reward, methods=["POST"]))
    return app
