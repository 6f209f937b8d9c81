"""Everything the training driver checks and arranges before OpenRLHF's `train()` starts Ray (driver only).

`parse_training_args` (called by hooks.py in place of OpenRLHF's parse_args) adds our flags, validates them
(flags.validate, flags.validate_simko), checks the model and data paths and the reward sources
(reward_preflight), then either swaps `train` for the dry run's report or precedes it by the wait for the
reward server. `derived_sizes` repeats the GPU-count checks that OpenRLHF's train() makes before it asks
Ray for anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openrlhf_passk import env
from openrlhf_passk.integration import flags, reward_preflight, upstream
from openrlhf_passk.integration.resolve import load_estimator_module
from openrlhf_passk.integration.reward import redact

# A name that can only be a local path: absolute, relative with ./ ../ ~, or a file name with a suffix.
# Hub ids are "name" or "org/name", so a name with two or more slashes is a local path too.
_LOCAL = re.compile(r"^(/|\.{1,2}/|~)|\.(jsonl?|csv|parquet|arrow|txt|py|bin|safetensors|pt)$", re.IGNORECASE)


def _is_local(source: str) -> bool:
    return os.path.exists(os.path.expanduser(source)) or bool(_LOCAL.search(source)) or source.count("/") > 1


def check_inputs(args: Any) -> tuple[list[dict], list[str]]:
    """Model paths and the prompt data, before anything starts: a local path that does not exist, a model
    directory without config.json, a data file whose first rows lack the input/label key -> ValueError
    naming the flag. Hub ids cannot be checked offline: a warning."""
    report, warnings = [], []
    layout = upstream.layout()
    for key in ("model", "reward_model", "critic_model"):
        value, flag = upstream.setting(args, key, layout), layout.flag(key)
        if key == "critic_model" and value and upstream.setting(args, "estimator", layout) != "gae":
            continue  # OpenRLHF drops it: parse_training_args warns, nothing to check
        for source in value.split(",") if isinstance(value, str) and value else ():
            if not _is_local(source):
                warnings.append(f"{flag} {source!r} is no local path: taken as a hub id, not checked offline")
                report.append({"flag": flag, "source": source, "check": "hub id, not checked offline"})
                continue
            path = Path(source).expanduser()
            if not path.exists():
                raise ValueError(f"{flag} {source!r} does not exist: give an existing model directory, or a hub id")
            if path.is_dir() and not (path / "config.json").is_file():
                raise ValueError(
                    f"{flag} {source!r} is a directory without config.json, so it is not a saved model "
                    "(save_pretrained writes one)"
                )
            report.append({"flag": flag, "source": source, "check": "exists"})
    data, data_flag = upstream.setting(args, "data", layout), layout.flag("data")
    input_key, input_flag = upstream.setting(args, "input_key", layout), layout.flag("input_key")
    label_key, label_flag = upstream.setting(args, "label_key", layout), layout.flag("label_key")
    for source in data.split(",") if isinstance(data, str) and data else ():
        if not _is_local(source):
            warnings.append(f"{data_flag} {source!r} is no local path: taken as a hub dataset, not checked offline")
            report.append({"flag": data_flag, "source": source, "check": "hub dataset, not checked offline"})
            continue
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"{data_flag} {source!r} does not exist: give the prompt data file (.jsonl/.json)")
        rows = _first_rows(path, data_flag)
        if rows is None:
            report.append({"flag": data_flag, "source": source, "check": "exists (keys not checked: not JSON)"})
            continue
        if not rows:
            raise ValueError(f"{data_flag} {source!r} has no rows")
        for i, row in enumerate(rows):
            for key, flag in ((input_key, input_flag), (label_key, label_flag)):
                if key is not None and (not isinstance(row, dict) or key not in row):
                    have = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(
                        f"{data_flag} {source!r}: row {i} has no {key!r} field ({flag}); its fields: {have}. "
                        f"Set {flag} to the field that holds the {'prompt' if flag == input_flag else 'label'}"
                    )
        report.append({"flag": data_flag, "source": source, "check": f"first {len(rows)} rows have the keys"})
    return report, warnings


def _first_rows(path: Path, flag: str, count: int = 3) -> list | None:
    """The first rows of a .jsonl / .json file (a JSON list, or JSON lines in a .json); None otherwise."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        return None
    try:
        with path.open(encoding="utf-8") as f:
            if path.suffix.lower() == ".json" and f.read(1) == "[":
                f.seek(0)
                return json.load(f)[:count]
            f.seek(0)
            rows = []
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                    if len(rows) == count:
                        break
            return rows
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {str(path)!r} could not be read as JSON: {exc}") from exc


def parse_training_args(parser, original_parse, layout: upstream.Layout, args=None, namespace=None):
    """OpenRLHF's parse_args with our estimators, flags, validation and dry run (called by hooks)."""
    argv = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--passk_estimator_module", default=None)
    try:
        load_estimator_module(pre.parse_known_args(argv)[0].passk_estimator_module)
    except ValueError as exc:
        parser.error(str(exc))
    flags.extend_parser(parser, layout)
    ns = original_parse(parser, args, namespace)
    if ns.passk_estimator_module and (ns.passk_estimator_module.endswith(".py") or os.sep in ns.passk_estimator_module):
        ns.passk_estimator_module = os.path.abspath(ns.passk_estimator_module)  # Ray workers may run elsewhere
    dry_run = env.env_flag(env.DRY_RUN)
    reward_value = upstream.arg(ns, layout.reward_dest)
    try:
        # OpenRLHF itself only fails on a missing model once Ray and the GPUs are up.
        if not upstream.arg(ns, layout.model_dest):
            raise ValueError(f"{layout.model_flag} is required: the policy model to train (a local path or a hub id)")
        summary, warnings = flags.validate(ns, layout)
        flags.validate_simko(ns)
        if ns.passk_reward_wait < 0:
            raise ValueError(f"--passk_reward_wait must be >= 0 seconds (0: no check), got {ns.passk_reward_wait}")
        input_report, input_warnings = check_inputs(ns)
        reward_report, reward_warnings = reward_preflight.check_sources(reward_value, layout.reward_flag, dry_run)
    except ValueError as exc:
        parser.error(str(exc))
    warnings += input_warnings + reward_warnings
    critic = upstream.setting(ns, "critic_model", layout)
    estimator = upstream.arg(ns, layout.estimator_dest)
    if critic and estimator != "gae":
        warnings.append(
            f"{layout.flag('critic_model')} {critic} is ignored: OpenRLHF trains a critic only with "
            f"{layout.estimator_flag} gae (it drops it for {estimator!r}); remove the flag"
        )
    for warning in warnings:
        print(f"[openrlhf-passk] WARNING: {warning}", file=sys.stderr)
    if summary is not None:
        print(f"[openrlhf-passk] {json.dumps(summary)}", file=sys.stderr)
    if dry_run:
        _arm_dry_run(summary, warnings, reward_report, input_report)
    elif ns.passk_reward_wait > 0:
        _arm_reward_wait(reward_value, ns.passk_reward_wait, layout.reward_flag)
    return ns


def _arm_reward_wait(reward_value, wait_s: float, flag: str) -> None:
    """Wait for http(s) reward servers right before OpenRLHF's `train()` (after its own checks, before Ray)."""
    urls = [s for s in reward_preflight.sources(reward_value) if reward_preflight.is_http(s)]
    if not urls:
        return
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == upstream.CLI_MODULE:
        main.train = reward_preflight.wrap_train(main.train, urls, wait_s, flag)
    else:  # parse_args called from elsewhere: wait now
        reward_preflight.wrap_train(lambda args: None, urls, wait_s, flag)(None)


def _arm_dry_run(summary, warnings, reward_report=(), input_report=()) -> None:
    """Let OpenRLHF finish its own checks, then print instead of `train(args)` (no Ray, no GPU).

    The report is strict JSON (non-finite numbers become strings) and the last thing on stdout."""

    def dry_run_train(args):
        try:
            sizes = derived_sizes(args)
        except ValueError as exc:
            print(f"[openrlhf-passk] dry run: OpenRLHF's train() would reject this: {exc}", file=sys.stderr)
            sys.exit(2)
        report = {
            "dry_run": "configuration is valid",
            "openrlhf": upstream.openrlhf_version(),
            "passk": summary,
            "sizes": sizes,
            "inputs": list(input_report),
            "reward": list(reward_report),
            "warnings": warnings,
            "args": args,
        }
        sys.stderr.flush()
        print(json.dumps(_plain(report), indent=2, allow_nan=False), flush=True)

    def excepthook(exc_type, exc, tb):  # OpenRLHF's own checks are asserts: show the message, not a traceback
        print(
            f"[openrlhf-passk] dry run: OpenRLHF rejected the configuration: {exc_type.__name__}: {exc}",
            file=sys.stderr,
        )

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != upstream.CLI_MODULE:
        dry_run_train(SimpleNamespace())
        sys.exit(0)
    main.train = dry_run_train
    sys.excepthook = excepthook


def derived_sizes(args: Any) -> dict[str, Any]:
    """The numbers a user checks by hand, and the GPU-count checks OpenRLHF's train() makes before it
    asks Ray for anything (ValueError with OpenRLHF's message, naming the flags)."""
    layout = upstream.layout()
    value = {key: upstream.setting(args, key, layout) for key in layout.dests}
    flag = {key: layout.flag(key) for key in layout.dests}
    n = upstream.arg(args, layout.n_samples_dest)
    actor = value["actor_nodes"] * value["actor_gpus"]
    engines = value["engines"] or 0
    vllm = engines * (value["tp"] or 1)
    colocated = bool(value["colocate_all"]) and not value["async"]
    uses_ref = (value["kl"] or 0) > 0
    if uses_ref and (value["colocate_actor_ref"] or value["colocate_all"]):
        if (value["actor_nodes"], value["actor_gpus"]) != (value["ref_nodes"], value["ref_gpus"]):
            raise ValueError(
                f"num_nodes and num_gpus_per_node must be the same when colocate actor and ref model: "
                f"{flag['actor_nodes']} x {flag['actor_gpus']} = {value['actor_nodes']} x {value['actor_gpus']}, "
                f"{flag['ref_nodes']} x {flag['ref_gpus']} = {value['ref_nodes']} x {value['ref_gpus']}"
            )
    if engines and colocated and actor != vllm:
        raise ValueError(
            f"with {flag['colocate_all']}, the actor GPUs ({flag['actor_nodes']} x {flag['actor_gpus']} = {actor}) "
            f"must equal {flag['engines']} x {flag['tp']} = {vllm}"
        )
    critic = value["critic_model"] and value["critic_nodes"] * value["critic_gpus"] or 0
    reward_model = 0 if upstream.arg(args, layout.reward_dest) else value["reward_nodes"] * value["reward_gpus"]
    if critic and value["colocate_critic_reward"]:
        if (value["critic_nodes"], value["critic_gpus"]) != (value["reward_nodes"], value["reward_gpus"]):
            raise ValueError(
                f"num_nodes and num_gpus_per_node must be the same when colocate critic and reward model "
                f"({flag['critic_nodes']}, {flag['critic_gpus']} vs {flag['reward_nodes']}, {flag['reward_gpus']})"
            )
        reward_model = 0
    if value["colocate_all"]:  # everything shares the actor's placement group (vLLM too, unless async)
        total = actor + (0 if colocated else vllm)
    else:
        ref = 0 if value["colocate_actor_ref"] or not uses_ref else value["ref_nodes"] * value["ref_gpus"]
        total = actor + ref + vllm + critic + reward_model
    samples = value["rollout_batch"] * n
    steps = samples * value["epochs"] / value["train_batch"]
    return {
        "actor_gpus": actor,
        "vllm_engines_x_tp": vllm,
        "gpus_requested": total,
        "samples_per_rollout": samples,
        "optimizer_steps_per_rollout": int(steps) if steps == int(steps) else steps,
    }


def _plain(value):
    """JSON-ready copy: namespaces and dicts to objects, non-finite floats and other objects to strings."""
    if isinstance(value, (SimpleNamespace, argparse.Namespace)):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "nan": strict JSON has no Infinity
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return str(value)
    # A reward URL may carry its token as ?token=...: never print it.
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return ",".join(redact(u) for u in value.split(","))
    return value
