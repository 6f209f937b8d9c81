"""The reward source, checked loudly: before training (file loads, server answers /health and accepts a
probe sample with our token) and per sample.

Upstream `SingleTurnAgentExecutor.execute` catches any reward error, logs it at INFO and leaves the
sample's reward None; training then fails or hangs far from the cause. `patch_agent` turns that into an
ERROR log naming the source plus a RuntimeError that stops the run. It also makes upstream's HTTP reward
client send `Authorization: Bearer <token>` when OPENRLHF_PASSK_REWARD_TOKEN is set (upstream sends no
headers, so a token could otherwise only ride in the URL, which OpenRLHF prints). OPENRLHF_PASSK_DISABLE=1
keeps upstream's behaviour (nothing is patched).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
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

from openrlhf_passk import env

# Per `execute` call: the exceptions and upstream log lines of its reward call. A mutable list in a
# ContextVar, because upstream posts from tasks it creates, which run in copies of the caller's context.
_trace: ContextVar[list | None] = ContextVar("openrlhf_passk_reward_trace", default=None)
DEFAULT_WAIT_S = 300
TOKEN_ENV = env.REWARD_TOKEN
# One tiny valid maze sample ("R" walks from S to E): a server of ours answers 200, and any server that
# checks a token answers 401/403 to a wrong one, which /health (open to probes) cannot reveal.
PROBE_SAMPLE = {"query": ["<answer>R</answer>"], "prompts": [""], "labels": ["SE"]}


def reward_token() -> str | None:
    """The token from OPENRLHF_PASSK_REWARD_TOKEN (None when unset); ValueError when set but empty,
    because silently sending no token would turn a misconfigured Secret into 401s far from the cause."""
    if TOKEN_ENV not in os.environ:
        return None
    token = os.environ[TOKEN_ENV].strip()
    if not token:
        raise ValueError(f"{TOKEN_ENV} is set but empty: set it to the reward server's token, or unset it")
    return token


def redact_text(text: str) -> str:
    """`text` with URL query strings and the reward token replaced: safe to print or log."""
    text = re.sub(r"\?[^'\"\s)]*", "?...", text)
    token = os.environ.get(TOKEN_ENV, "").strip()
    return text.replace(token, "***") if token else text


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
    """Poll `url`'s /health until it answers, up to `wait_s` seconds, then send one probe sample;
    RuntimeError naming the URL if it never answers, or naming the token on 401/403."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        ready, detail = probe(url, timeout=max(0.1, min(3.0, deadline - time.monotonic())))
        if ready:
            accepted, sample = probe_sample(url)
            if not accepted:
                raise RuntimeError(f"{flag}: {sample}")
            return f"{detail}; {sample}"
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


def probe_sample(url: str, timeout: float = 10.0) -> tuple[bool, str]:
    """POST one tiny sample to `url` as OpenRLHF's client would (with our Bearer header when the token
    variable is set): (False, message naming the token) on 401/403, else (True, what happened)."""
    headers = {"Content-Type": "application/json"}
    token = reward_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(PROBE_SAMPLE).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return True, f"a probe sample was answered {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            sent = [f"env {TOKEN_ENV} as a Bearer header"] if token else []
            sent += ["the URL's ?token="] if "token=" in urllib.parse.urlsplit(url).query else []
            where = " and ".join(sent) or f"none: no ?token= in the URL and no env {TOKEN_ENV}"
            return False, (
                f"the reward server {redact(url)} refused a probe sample with {exc.code}: the reward token is "
                f"missing or wrong (token used: {where}). Set the server's token in {TOKEN_ENV} where OpenRLHF's "
                "driver and rollout workers run, or in the URL's ?token="
            )
        if exc.code >= 500:
            return False, (
                f"the reward server {redact(url)} answered a probe sample with {exc.code}: it is up but fails "
                "on a request, so every sample of the run would fail. Check the server's log"
            )
        return True, f"a probe sample was answered {exc.code} (401/403 and 5xx fail this check)"
    except (urllib.error.URLError, OSError) as exc:
        return True, f"a probe sample got no answer: {redact_text(str(getattr(exc, 'reason', exc)))}"


def check_sources(value: Any, flag: str, dry_run: bool) -> tuple[list[dict], list[str]]:
    """Validation-time checks of the reward flag: one .py file, or only URLs (OpenRLHF cannot mix them); the
    file must load (ValueError otherwise); in a dry run each URL is probed once (/health, then one sample:
    401/403 is a ValueError naming the token, 5xx one naming the server) and reported, never waited for.
    Returns (report, warnings)."""
    report, warnings = [], []
    kinds = {"file" if s.endswith(".py") else "url" for s in sources(value)}
    if len(kinds) > 1:
        raise ValueError(
            f"{flag} {','.join(redact(s) for s in sources(value))} mixes a .py reward file and URLs: OpenRLHF "
            "scores every sample with the first .py file when one comes first, and POSTs to every entry in turn "
            "(a .py path included) otherwise. Give one .py file, or only URLs"
        )
    files = [s for s in sources(value) if s.endswith(".py")]
    if len(files) > 1:
        raise ValueError(
            f"{flag} names {len(files)} reward files ({', '.join(files)}): OpenRLHF loads only the first one. "
            "Give one .py file (it may call the others)"
        )
    if any(is_http(s) for s in sources(value)):
        try:
            reward_token()
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
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
                if ready:
                    accepted, entry["probe_sample"] = probe_sample(source)
                    if not accepted:
                        raise ValueError(f"{flag}: {entry['probe_sample']}")
                else:
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
            except (RuntimeError, ValueError) as exc:  # ValueError: the token variable is set but empty
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
        f"cause, so the run stops here. Fix: {fix}. OPENRLHF_PASSK_DISABLE=1 restores upstream's behaviour.",
        cause,
    )


_logged_traceback: list[bool] = []


def _aiohttp_with_token(aiohttp: ModuleType) -> ModuleType:
    """A copy of the `aiohttp` module whose ClientSession sends `Authorization: Bearer <token>` when
    OPENRLHF_PASSK_REWARD_TOKEN is set (read per session, so the engine actor's environment counts).
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
