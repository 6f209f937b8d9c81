"""Our flags on OpenRLHF's `train_ppo_ray` command line: definition, resolution, validation, dry run.

The flags live in OpenRLHF's own parser (added by `extend_parser`), so their values travel with
OpenRLHF's `args` into the Ray workers, where `resolve` turns them into registry parameters each step.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openrlhf_passk import advantages
from openrlhf_passk.integration import reward, upstream

DRY_RUN_ENV = "OPENRLHF_PASSK_DRY_RUN"
# Registry parameter -> our flag. A flag the chosen estimator does not take is an error, not ignored.
PARAM_FLAGS = {
    "k": "passk_k",
    "num_groups": "passk_num_groups",
    "seed": "passk_seed",
    "reduce": "passk_reduce",
    "baseline": "passk_baseline",
    "f": "passk_f",
}
# Flags that only make sense with one of our estimators (their defaults are None or the constant schedule).
OUR_FLAGS = (*PARAM_FLAGS.values(), "passk_param", "passk_k_end", "passk_k_schedule_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the openrlhf-passk flags (an argument group, so they show together in --help)."""
    group = parser.add_argument_group(
        "openrlhf-passk (Pass@k Training)",
        "Used when the advantage estimator is one of the openrlhf-passk estimators "
        f"({', '.join(advantages.available())}). {DRY_RUN_ENV}=1 validates the command and prints the "
        "resolved configuration without starting anything.",
    )
    group.add_argument("--passk_k", type=int, default=None, help="k of Pass@k (k <= n_samples_per_prompt)")
    group.add_argument(
        "--passk_k_schedule",
        choices=["constant", "linear", "step"],
        default="constant",
        help="anneal k from --passk_k to --passk_k_end over --passk_k_schedule_steps training steps "
        "(OpenRLHF's global_step: one step per rollout batch, restored on resume)",
    )
    group.add_argument("--passk_k_end", type=int, default=None, help="final k of the schedule (default 1)")
    group.add_argument(
        "--passk_k_schedule_steps", type=int, default=None, help="steps over which k anneals (schedule only)"
    )
    group.add_argument(
        "--passk_k_switch_at",
        type=float,
        default=0.5,
        help="'step' schedule: fraction of the steps after which k becomes --passk_k_end",
    )
    group.add_argument("--passk_num_groups", type=int, default=None, help="passk_bootstrap: groups M (default N)")
    group.add_argument("--passk_seed", type=int, default=None, help="passk_bootstrap: RNG seed")
    group.add_argument("--passk_reduce", choices=["mean", "sum"], default=None, help="passk_bootstrap: mean|sum")
    group.add_argument("--passk_baseline", choices=["none", "loo", "loo-1"], default=None, help="pkpo: baseline")
    group.add_argument("--passk_f", type=str, default=None, help="passk_exceed: weight f(N_pos) ('linear')")
    group.add_argument(
        "--passk_param",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="extra estimator parameter (repeatable), e.g. for your own registered estimators",
    )
    group.add_argument(
        "--passk_estimator_module",
        type=str,
        default=None,
        help="Python module name or .py path that registers estimators with "
        "openrlhf_passk.advantages.register; they become valid estimator choices (Ray workers load it too)",
    )
    group.add_argument(
        "--passk_success_threshold",
        type=float,
        default=1.0,
        help="logged pass@1/pass@k: a sample is correct if its reward (before length penalties) is >= this",
    )
    group.add_argument(
        "--passk_reward_wait",
        type=float,
        default=reward.DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="before training, wait up to this long for an http(s) reward server's /health (0: no check). "
        "A .py reward file is always checked to load and define reward_func",
    )


def extend_parser(parser: argparse.ArgumentParser, layout: upstream.Layout) -> None:
    """Make every registry estimator a valid choice of OpenRLHF's estimator flag and add our flags."""
    from openrlhf_passk.integration import simko

    action = parser._option_string_actions[layout.estimator_flag]
    ours = [name for name in advantages.available() if name not in action.choices]
    action.choices = [*action.choices, *ours]
    action.help = f"{action.help or ''} openrlhf-passk adds: {', '.join(ours)} (see the passk flags below)."
    for alias, flag in layout.flag_aliases:  # the mission's 0.9 spellings, on 0.11 too
        target = parser._option_string_actions.get(flag)
        if target is not None and alias not in parser._option_string_actions:
            target.option_strings.append(alias)
            parser._option_string_actions[alias] = target
    add_arguments(parser)
    simko.add_arguments(parser)


def load_estimator_module(spec: str | None) -> None:
    """Import a users' module (name or .py path) that registers estimators; once per process."""
    if not spec or spec in _loaded_modules:
        return
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module_spec = importlib.util.spec_from_file_location(f"openrlhf_passk_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except Exception as exc:
        raise ValueError(f"--passk_estimator_module {spec!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    _loaded_modules.add(spec)


_loaded_modules: set[str] = set()


def _parse_param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--passk_param expects NAME=VALUE (e.g. alpha=0.5), got {text!r}")
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw  # a bare word is a string


def resolve(args: Any, layout: upstream.Layout, step: int = 0) -> dict[str, Any] | None:
    """Registry name and parameters in force at training step `step`; None for OpenRLHF's own estimators."""
    name = upstream.arg(args, layout.estimator_dest)
    if name in layout.builtin_estimators:
        return None
    signature = inspect.signature(advantages.get(name)).parameters
    accepted = [p for p in list(signature)[1:] if signature[p].kind is not inspect.Parameter.VAR_KEYWORD]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    params: dict[str, Any] = {}
    for param, flag in PARAM_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if param not in accepted and not takes_any:
            raise ValueError(
                f"--{flag} does not apply to the {name!r} estimator (its parameters: {', '.join(accepted) or 'none'})"
            )
        params[param] = value
    params.update(_parse_param(text) for text in getattr(args, "passk_param", None) or ())

    schedule = getattr(args, "passk_k_schedule", "constant")
    if "k" in accepted and "k" not in params and signature["k"].default is inspect.Parameter.empty:
        raise ValueError(f"the {name!r} estimator needs k: add --passk_k K (K <= n_samples_per_prompt)")
    if schedule != "constant":
        if "k" not in params:
            raise ValueError(f"--passk_k_schedule {schedule} anneals k, so it needs --passk_k (the starting k)")
        if getattr(args, "passk_k_schedule_steps", None) is None:
            raise ValueError(f"--passk_k_schedule {schedule} needs --passk_k_schedule_steps (training steps)")
        params["k"] = advantages.k_schedule(
            step,
            k_start=params["k"],
            k_end=1 if args.passk_k_end is None else args.passk_k_end,
            total_steps=args.passk_k_schedule_steps,
            kind=schedule,
            switch_at=args.passk_k_switch_at,
        )
    return {"estimator": name, "params": params}


def validate(args: Any, layout: upstream.Layout) -> tuple[dict[str, Any] | None, list[str]]:
    """Check the configuration before anything starts. Returns (summary, warnings); ValueError if bad."""
    n = upstream.arg(args, layout.n_samples_dest)
    resolved = resolve(args, layout, 0)
    if resolved is None:
        given = [f"--{flag}" for flag in OUR_FLAGS if getattr(args, flag, None) is not None]
        if getattr(args, "passk_k_schedule", "constant") != "constant":
            given.append("--passk_k_schedule")
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply to openrlhf-passk estimators, but {layout.estimator_flag} "
                f"is {upstream.arg(args, layout.estimator_dest)!r}; "
                f"choose one of {', '.join(advantages.available())}"
            )
        return None, []
    name, params = resolved["estimator"], resolved["params"]
    if n < 2:
        raise ValueError(f"{name} compares the rollouts of a prompt, so it needs {layout.n_samples_flag} >= 2, got {n}")

    schedule = args.passk_k_schedule
    if schedule != "constant":
        if args.passk_k_schedule_steps < 1:
            raise ValueError(f"--passk_k_schedule_steps must be >= 1, got {args.passk_k_schedule_steps}")
        steps = range(args.passk_k_schedule_steps + 1)
        ks = sorted({resolve(args, layout, s)["params"]["k"] for s in steps}, reverse=True)
    else:
        ks = [params.get("k")]

    warnings, zero_counts = [], {}
    for k in ks:
        trial = dict(params)
        if k is not None:
            trial["k"] = k
            if not 1 <= k <= n:
                raise ValueError(f"--passk_k must satisfy 1 <= k <= {layout.n_samples_flag} ({n}); got k={k}")
            if name == "passk_full" and n % k:
                divisors = [d for d in range(1, n + 1) if n % d == 0]
                raise ValueError(
                    f"passk_full splits the {n} samples of a prompt into groups of k, so "
                    f"{layout.n_samples_flag} ({n}) must be a multiple of k={k}; choose k among {divisors}"
                )
        # One group per possible number of correct samples c = 0..N: finds the groups that learn nothing.
        import torch

        pattern = (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1)).float()
        try:
            adv = advantages.compute(name, pattern, **trial)
        except ValueError as exc:
            raise ValueError(f"{name} rejects its parameters {trial}: {exc}") from exc
        zero = [c for c in range(n + 1) if bool((adv[c] == 0).all())]
        zero_counts[k] = zero
        if len(zero) == n + 1:
            warnings.append(
                f"with k={k} and {n} samples per prompt, EVERY group's {name} advantage is 0 "
                "for 0/1 rewards: "
                "nothing will be learned at this k; lower --passk_k or raise the samples per prompt"
            )
    summary = {
        "estimator": name,
        "n_samples_per_prompt": n,
        "params_at_step_0": params,
        "k_schedule": None
        if schedule == "constant"
        else {
            "kind": schedule,
            "k_start": args.passk_k,
            "k_end": 1 if args.passk_k_end is None else args.passk_k_end,
            "steps": args.passk_k_schedule_steps,
            "k_values": ks,
        },
        "zero_advantage_correct_counts": {str(k): _ranges(v) for k, v in zero_counts.items()},
        "success_threshold": args.passk_success_threshold,
        "estimator_module": args.passk_estimator_module,
    }
    return summary, warnings


def _ranges(values: list[int]) -> str:
    """[0, 25, 26, 27, 32] -> "0, 25-27, 32"."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def parse_training_args(parser, original_parse, layout: upstream.Layout, args=None, namespace=None):
    """OpenRLHF's parse_args with our estimators, flags, validation and dry run (called by hooks)."""
    from openrlhf_passk.integration import simko

    argv = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--passk_estimator_module", default=None)
    try:
        load_estimator_module(pre.parse_known_args(argv)[0].passk_estimator_module)
    except ValueError as exc:
        parser.error(str(exc))
    extend_parser(parser, layout)
    ns = original_parse(parser, args, namespace)
    if ns.passk_estimator_module and (ns.passk_estimator_module.endswith(".py") or os.sep in ns.passk_estimator_module):
        ns.passk_estimator_module = os.path.abspath(ns.passk_estimator_module)  # Ray workers may run elsewhere
    dry_run = os.environ.get(DRY_RUN_ENV, "").strip() not in ("", "0")
    reward_value = upstream.arg(ns, layout.reward_dest)
    try:
        # OpenRLHF itself only fails on a missing model once Ray and the GPUs are up.
        if not upstream.arg(ns, layout.model_dest):
            raise ValueError(f"{layout.model_flag} is required: the policy model to train (a local path or a hub id)")
        summary, warnings = validate(ns, layout)
        simko.validate(ns)
        if ns.passk_reward_wait < 0:
            raise ValueError(f"--passk_reward_wait must be >= 0 seconds (0: no check), got {ns.passk_reward_wait}")
        reward_report, reward_warnings = reward.check_sources(reward_value, layout.reward_flag, dry_run)
    except ValueError as exc:
        parser.error(str(exc))
    warnings += reward_warnings
    for warning in warnings:
        print(f"[openrlhf-passk] WARNING: {warning}", file=sys.stderr)
    if summary is not None:
        print(f"[openrlhf-passk] {json.dumps(summary)}", file=sys.stderr)
    if dry_run:
        _arm_dry_run(summary, warnings, reward_report)
    elif ns.passk_reward_wait > 0:
        _arm_reward_wait(reward_value, ns.passk_reward_wait, layout.reward_flag)
    return ns


def _arm_reward_wait(reward_value, wait_s: float, flag: str) -> None:
    """Wait for http(s) reward servers right before OpenRLHF's `train()` (after its own checks, before Ray)."""
    urls = [s for s in reward.sources(reward_value) if reward.is_http(s)]
    if not urls:
        return
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == upstream.CLI_MODULE:
        main.train = reward.wrap_train(main.train, urls, wait_s, flag)
    else:  # parse_args called from elsewhere: wait now
        reward.wrap_train(lambda args: None, urls, wait_s, flag)(None)


def _arm_dry_run(summary, warnings, reward_report=()) -> None:
    """Let OpenRLHF finish its own checks, then print instead of `train(args)` (no Ray, no GPU)."""

    def dry_run_train(args):
        print(
            json.dumps(
                {
                    "dry_run": "configuration is valid",
                    "openrlhf": upstream.openrlhf_version(),
                    "passk": summary,
                    "reward": list(reward_report),
                    "warnings": warnings,
                    "args": _plain(args),
                },
                indent=2,
                default=str,
            )
        )

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


def _plain(value):
    if isinstance(value, (SimpleNamespace, argparse.Namespace)):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # A reward URL may carry its token as ?token=...: never print it.
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return ",".join(reward.redact(u) for u in value.split(","))
    return value
