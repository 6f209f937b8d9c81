"""The reward source checks the training driver makes before Ray starts (driver only; the per-sample check
in the rollout workers is `reward.patch_agent`).

- `check_sources`, while the arguments are validated: one .py reward file or only URLs; the file loads and
  defines reward_func; in a dry run each URL is probed once (never waited for).
- `wrap_train`, in a real run: OpenRLHF's `train(args)` preceded by the wait for each reward server.

What a server's answers mean, in both: no answer is "not up yet" (a dry run warns, a real run waits up to
--passk_reward_wait, then exits 1); a 5xx is a broken server, and a probe sample refused with 401/403 a
wrong token (both refused with exit 2, as bad input, in a dry run and in a real run alike); any other
answer means the server is up.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openrlhf_passk.integration.reward import TOKEN_ENV, redact, redact_text, reward_token

DEFAULT_WAIT_S = 300
# One tiny valid maze sample ("R" walks from S to E): a server of ours answers 200, and any server that
# checks a token answers 401/403 to a wrong one, which /health (open to probes) cannot reveal.
PROBE_SAMPLE = {"query": ["<answer>R</answer>"], "prompts": [""], "labels": ["SE"]}


def sources(value: str | list[str] | None) -> list[str]:
    """OpenRLHF's reward flag value ("a,b" before its own split, a list after) as a list."""
    if not value:
        return []
    return [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]


def is_http(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


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


def probe(url: str, timeout: float = 3.0) -> tuple[int | None, str]:
    """One GET of the server's /health: (the HTTP status, None when nothing answered; what happened)."""
    parts = urllib.parse.urlsplit(url)
    target = f"{parts.scheme}://{parts.netloc}/health"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            return response.status, f"{target} answered {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):  # a server of the user's own without /health: up, readiness unknown
            return exc.code, f"{target} answered {exc.code}: the server is up but has no /health endpoint"
        return exc.code, f"{target} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return None, f"{target} is not reachable: {getattr(exc, 'reason', exc)}"


def _broken(url: str, flag: str, detail: str) -> str:
    return (
        f"the reward server {redact(url)} ({flag}) answered 5xx: it is up but broken ({detail}), so every "
        "sample of the run would fail. Check the server's log (openrlhf-passk serve-reward answers 503 until "
        "its self-check passes)"
    )


def wait_ready(url: str, wait_s: float, flag: str, interval: float = 1.0) -> str:
    """Poll `url`'s /health until the server is up, up to `wait_s` seconds, then send one probe sample.

    RuntimeError naming the URL when nothing answered in time; ValueError when the server answered but
    cannot serve the run: the probe sample refused (401/403, the token) or failed (5xx), or /health still
    answering 5xx at the end of the wait (a starting server answers 503, so 5xx is waited out first)."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        status, detail = probe(url, timeout=max(0.1, min(3.0, deadline - time.monotonic())))
        if status is not None and status < 500:
            accepted, sample = probe_sample(url)
            if not accepted:
                raise ValueError(f"{flag}: {sample}")
            return f"{detail}; {sample}"
        if time.monotonic() + interval > deadline:
            if status is not None:
                raise ValueError(_broken(url, flag, f"{detail}, still after {wait_s:g} s"))
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
    variable is set): (False, a message naming the token) on 401/403, (False, one naming the server) on
    5xx, else (True, what happened)."""
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
    file must load (ValueError otherwise); in a dry run each URL is probed once (/health, then one sample)
    and reported, never waited for: no answer is a warning, a 5xx or a refused token a ValueError.
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
                status, entry["health"] = probe(source, timeout=2.0)
                if status is None:
                    warnings.append(
                        f"reward server {redact(source)} is not reachable from here ({entry['health']}); a real "
                        "run waits --passk_reward_wait seconds for it, then stops"
                    )
                elif status >= 500:
                    raise ValueError(_broken(source, flag, entry["health"]))
                else:
                    accepted, entry["probe_sample"] = probe_sample(source)
                    if not accepted:
                        raise ValueError(f"{flag}: {entry['probe_sample']}")
            report.append(entry)
    return report, warnings


def wrap_train(train: Callable, urls: list[str], wait_s: float, flag: str) -> Callable:
    """`train(args)` of OpenRLHF's CLI, preceded by the readiness wait (after OpenRLHF's own checks, before
    Ray starts). A failed wait exits with the message, not a traceback: 2 when the server answered but
    cannot serve the run or the token variable is empty (as the dry run refuses them), 1 when nothing
    answered in time."""

    @functools.wraps(train)
    def train_when_ready(args):
        for url in urls:
            try:
                print(f"[openrlhf-passk] reward server ready: {wait_ready(url, wait_s, flag)}", file=sys.stderr)
            except (RuntimeError, ValueError) as exc:
                print(f"[openrlhf-passk] error: {exc}", file=sys.stderr)
                sys.exit(2 if isinstance(exc, ValueError) else 1)
        return train(args)

    return train_when_ready
