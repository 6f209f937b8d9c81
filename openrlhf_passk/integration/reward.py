"""The reward source, checked per sample in the rollout workers (the vLLM engine Ray actors), where
`patch_agent` runs when upstream's agent module is imported. The checks the driver makes before training
are in `reward_preflight`; the token and redaction helpers below serve both.

Upstream `SingleTurnAgentExecutor.execute` catches any reward error, logs it at INFO and leaves the
sample's reward None; training then fails or hangs far from the cause. `patch_agent` turns that into an
ERROR log naming the source plus a RuntimeError that stops the run. It also makes upstream's HTTP reward
client send `Authorization: Bearer <token>` when the token variable (env.REWARD_TOKEN) is set (upstream
sends no headers, so a token could otherwise only ride in the URL, which OpenRLHF prints). With
env.DISABLE on, nothing is patched and upstream's behaviour stays.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from openrlhf_passk import env

# Per `execute` call: the exceptions and upstream log lines of its reward call. A mutable list in a
# ContextVar, because upstream posts from tasks it creates, which run in copies of the caller's context.
_trace: ContextVar[list | None] = ContextVar("openrlhf_passk_reward_trace", default=None)
TOKEN_ENV = env.REWARD_TOKEN


def reward_token() -> str | None:
    """The token from the token variable (None when unset); ValueError when set but empty, because
    silently sending no token would turn a misconfigured Secret into 401s far from the cause."""
    if TOKEN_ENV not in os.environ:
        return None
    token = os.environ[TOKEN_ENV].strip()
    if not token:
        raise ValueError(f"{TOKEN_ENV} is set but empty: set it to the reward server's token, or unset it")
    return token


def redact(url: str) -> str:
    """The URL without its query: a token may ride there (OpenRLHF's client sends no auth header)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "...", "") if parts.query else parts)


def redact_text(text: str) -> str:
    """`text` with URL query strings and the reward token replaced: safe to print or log."""
    text = re.sub(r"\?[^'\"\s)]*", "?...", text)
    token = os.environ.get(TOKEN_ENV, "").strip()
    return text.replace(token, "***") if token else text


class _KeepRetryLines(logging.Filter):
    """Copies upstream's per-try error lines (logged by its inner `_post_request`) into the current call's
    trace, query strings redacted; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = _trace.get()
        if trace is not None and record.funcName == "_post_request":
            trace.append(redact_text(record.getMessage()))
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
    what = redact_text(f"{type(cause).__name__}: {cause}") if cause else "no reward (upstream logged why at INFO above)"
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
        f"cause, so the run stops here. Fix: {fix}. {env.DISABLE}=1 restores upstream's behaviour.",
        cause,
    )


_logged_traceback: list[bool] = []


def _aiohttp_with_token(aiohttp: ModuleType) -> ModuleType:
    """A copy of the `aiohttp` module whose ClientSession sends `Authorization: Bearer <token>` when
    the token variable is set (read per session, so the engine actor's environment counts).
    Upstream's reward client (0.11.2 and 0.9.10) opens `aiohttp.ClientSession(timeout=...)` per request
    inside `_fetch_rewards_via_http`; swapping the name its module sees changes nothing else."""
    patched = ModuleType(aiohttp.__name__, aiohttp.__doc__)
    patched.__dict__.update(aiohttp.__dict__)

    def client_session(*args, **kwargs):
        token = reward_token()
        if token:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Bearer {token}"}
        return aiohttp.ClientSession(*args, **kwargs)

    patched.ClientSession = client_session
    return patched


def patch_agent(module: ModuleType) -> None:
    """Make a failed reward call raise instead of giving the sample reward None, and send the reward
    token as a Bearer header (see the module doc)."""
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
    module.aiohttp = _aiohttp_with_token(module.aiohttp)
    cls._fetch_rewards_via_func = _checked_fetch(cls._fetch_rewards_via_func)
    cls._fetch_rewards_via_http = _checked_fetch(cls._fetch_rewards_via_http)
    logger.addFilter(_KeepRetryLines())
