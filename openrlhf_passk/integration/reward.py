"""The reward source, checked loudly: before training (file loads, server answers /health) and per sample.

Upstream `SingleTurnAgentExecutor.execute` catches any reward error, logs it at INFO and leaves the
sample's reward None; training then fails or hangs far from the cause. `patch_agent` turns that into an
ERROR log naming the source plus a RuntimeError that stops the run. OPENRLHF_PASSK_DISABLE=1 keeps
upstream's behaviour (nothing is patched).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Any

# Per `execute` call: the exceptions and upstream log lines of its reward call. A mutable list in a
# ContextVar, because upstream posts from tasks it creates, which run in copies of the caller's context.
_trace: ContextVar[list | None] = ContextVar("openrlhf_passk_reward_trace", default=None)
DEFAULT_WAIT_S = 300


def sources(value: str | list[str] | None) -> list[str]:
    """OpenRLHF's reward flag value ("a,b" before its own split, a list after) as a list."""
    if not value:
        return []
    return [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]


def is_http(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL without its query: a token may ride there (OpenRLHF's client sends no auth header)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "...", "") if parts.query else parts)


def health_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/health"


def check_reward_file(path: str) -> None:
    """ValueError unless `path` exists, runs, and defines a callable `reward_func` (as OpenRLHF loads it)."""
    file = Path(path)
    fix = "pass an existing Python file defining reward_func(queries, prompts, labels, **kwargs)"
    if not file.is_file():
        raise ValueError(f"reward file {path} does not exist ({fix})")
    try:
        # The same loading as upstream's SingleTurnAgentExecutor: not part of a package, absolute imports.
        spec = importlib.util.spec_from_file_location("reward_func", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit from a script's top level too
        raise ValueError(
            f"reward file {path} failed to load: {type(exc).__name__}: {exc} (it is loaded on its own, "
            "not as part of a package, so it must use absolute imports)"
        ) from exc
    if not callable(getattr(module, "reward_func", None)):
        raise ValueError(f"reward file {path} defines no function reward_func ({fix})")


def probe(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """One GET of the server's /health: (ready, what happened)."""
    target = health_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            return True, f"{target} answered {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):  # a server of the user's own without /health: up, readiness unknown
            return True, f"{target} answered {exc.code}: the server is up but has no /health endpoint"
        return False, f"{target} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{target} is not reachable: {reason}"


def wait_ready(url: str, wait_s: float, flag: str, interval: float = 1.0) -> str:
    """Poll `url`'s /health until it answers, up to `wait_s` seconds; RuntimeError naming the URL if not."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        ready, detail = probe(url, timeout=max(0.1, min(3.0, deadline - time.monotonic())))
        if ready:
            return detail
        if time.monotonic() + interval > deadline:
            raise RuntimeError(
                f"the reward server {redact(url)} ({flag}) is not ready after {wait_s:g} s: {detail}. Start it "
                "first (e.g. openrlhf-passk serve-reward --task maze --host 0.0.0.0 --port PORT) and check the "
                "URL is reachable from this machine; --passk_reward_wait SECONDS waits longer, 0 skips the check"
            )
        if not announced:
            print(f"[openrlhf-passk] waiting up to {wait_s:g} s for the reward server: {detail}", file=sys.stderr)
            announced = True
        time.sleep(interval)


def check_sources(value: Any, flag: str, dry_run: bool) -> tuple[list[dict], list[str]]:
    """Validation-time checks of the reward flag: .py files must load (ValueError otherwise); in a dry run
    each URL is probed once and reported, never waited for. Returns (report, warnings)."""
    report, warnings = [], []
    for source in sources(value):
        if source.endswith(".py"):
            try:
                check_reward_file(source)
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from exc
            report.append({"source": source, "kind": "reward_func file", "check": "loads, defines reward_func"})
        elif is_http(source):
            entry = {"source": redact(source), "kind": "http"}
            if dry_run:
                ready, detail = probe(source, timeout=2.0)
                entry["health"] = detail
                if not ready:
                    warnings.append(
                        f"reward server {redact(source)} is not reachable from here ({detail}); a real run "
                        "waits --passk_reward_wait seconds for it, then stops"
                    )
            report.append(entry)
    return report, warnings


def wrap_train(train, urls: list[str], wait_s: float, flag: str):
    """`train(args)` of OpenRLHF's CLI, preceded by the readiness wait (after OpenRLHF's own checks,
    before Ray starts). A timeout exits with the message, not a traceback."""

    @functools.wraps(train)
    def train_when_ready(args):
        for url in urls:
            try:
                print(f"[openrlhf-passk] reward server ready: {wait_ready(url, wait_s, flag)}", file=sys.stderr)
            except RuntimeError as exc:
                sys.exit(f"[openrlhf-passk] error: {exc}")
        return train(args)

    return train_when_ready


# --- per sample, in the vLLM engine actors ----------------------------------------------------------


class _KeepRetryLines(logging.Filter):
    """Copies upstream's per-try error lines (logged by its inner `_post_request`) into the current call's
    trace, query strings redacted; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = _trace.get()
        if trace is not None and record.funcName == "_post_request":
            trace.append(re.sub(r"\?[^'\"\s]*", "?...", record.getMessage()))
        return True


def _malformed(result: Any) -> str | None:
    """Why a fetch result is unusable (upstream would set reward None), or None if it is fine."""
    if not isinstance(result, (list, tuple)) or not result:
        return f"expected one result per request, got {type(result).__name__}: {result!r:.200}"
    for item in result:
        if not isinstance(item, Mapping):
            return f"expected a dict with 'rewards', got {type(item).__name__}: {item!r:.200}"
        if item.get("rewards") is None:
            return f"the result has no 'rewards' (keys: {sorted(item)})"
    return None


def _checked_fetch(fetch):
    @functools.wraps(fetch)
    async def checked(self, queries, prompts, labels):
        trace = _trace.get()
        try:
            result = await fetch(self, queries, prompts, labels)
        except Exception as exc:
            if trace is not None:
                trace.append(exc)
            raise
        problem = _malformed(result)
        if problem is not None:
            exc = ValueError(f"malformed reward response: {problem}")
            if trace is not None:
                trace.append(exc)
            raise exc
        return result

    return checked


def _failure_message(endpoints: list[str], trace: list) -> tuple[str, BaseException | None]:
    errors = [e for e in trace if isinstance(e, BaseException)]
    cause = errors[-1] if errors else None
    what = f"{type(cause).__name__}: {cause}" if cause else "no reward (upstream logged why at INFO above)"
    source = ", ".join(redact(e) for e in endpoints)
    if endpoints[0].endswith(".py"):
        fix = (
            f"fix reward_func in {source} or the data it was given, as the error says (reward_func must "
            "return a dict with 'rewards', 'scores' and optionally 'extra_logs', and not raise)"
        )
        head = f"the reward file {source} failed for a sample: {what}"
    else:
        tries = [line for line in trace if isinstance(line, str)]
        if tries:
            what += f" (upstream's tries: {' | '.join(dict.fromkeys(tries))})"
        fix = (
            "check the reward server is running and reachable from the vLLM engines (its /health), and that "
            "POST answers JSON with 'rewards'"
        )
        head = f"the reward server {source} failed for a sample: {what}"
    return (
        f"openrlhf-passk: {head}. OpenRLHF would continue with reward None and fail later, far from the "
        f"cause, so the run stops here. Fix: {fix}. OPENRLHF_PASSK_DISABLE=1 restores upstream's behaviour.",
        cause,
    )


_logged_traceback: list[bool] = []


def patch_agent(module: ModuleType) -> None:
    """Make a failed reward call raise instead of giving the sample reward None (see the module doc)."""
    cls = module.SingleTurnAgentExecutor
    execute = cls.execute
    logger = module.logger

    @functools.wraps(execute)
    async def execute_or_raise(self, *args, **kwargs):
        trace: list = []
        token = _trace.set(trace)
        try:
            output = await execute(self, *args, **kwargs)
        finally:
            _trace.reset(token)
        if self.reward_endpoints and (any(isinstance(e, BaseException) for e in trace) or output.get("reward") is None):
            message, cause = _failure_message(self.reward_endpoints, trace)
            # Every in-flight sample fails the same way: one traceback per process is enough.
            logger.error(message, exc_info=None if _logged_traceback else cause)
            _logged_traceback[:] = [True]
            raise RuntimeError(message) from cause
        return output

    cls.execute = execute_or_raise
    cls._fetch_rewards_via_func = _checked_fetch(cls._fetch_rewards_via_func)
    cls._fetch_rewards_via_http = _checked_fetch(cls._fetch_rewards_via_http)
    logger.addFilter(_KeepRetryLines())
