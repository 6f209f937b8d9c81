"""The estimator and its parameters at a training step, from OpenRLHF's args: what the Ray workers run each step
(the PPOTrainer actor's experience maker, the policy actors' entropy capture). The driver runs the same code
once per step of the k schedule when it checks the command (flags.validate).

Our flags live in OpenRLHF's own parser (flags.add_arguments), so their values travel with `args` into the
workers. A users' estimator module (--passk_estimator_module) is imported in each process that resolves.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from openrlhf_passk import advantages
from openrlhf_passk.integration import upstream

# Registry parameter -> our flag. A flag the chosen estimator does not take is an error, not ignored.
PARAM_FLAGS = {
    "k": "passk_k",
    "num_groups": "passk_num_groups",
    "seed": "passk_seed",
    "reduce": "passk_reduce",
    "baseline": "passk_baseline",
    "f": "passk_f",
    "split": "passk_adaptive_split",
}

_loaded_modules: set[str] = set()


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


def _parse_param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--passk_param expects NAME=VALUE (e.g. alpha=0.5), got {text!r}")
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw  # a bare word is a string


def estimator_name(args: Any, layout: upstream.Layout | None = None) -> str | None:
    """The registry estimator the args select (its module loaded); None for OpenRLHF's own estimators."""
    layout = layout or upstream.layout()
    name = upstream.arg(args, layout.estimator_dest)
    if name in layout.builtin_estimators:
        return None
    load_estimator_module(getattr(args, "passk_estimator_module", None))
    return name


def resolve(args: Any, layout: upstream.Layout, step: int = 0) -> dict[str, Any] | None:
    """Registry name, parameters and per-step inputs in force at training step `step`; None for OpenRLHF's
    own estimators. ValueError names the flag at fault."""
    name = estimator_name(args, layout)
    if name is None:
        return None
    estimator = advantages.spec(name)
    accepted, takes_any = settings(name)
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
    for text in getattr(args, "passk_param", None) or ():
        param, value = _parse_param(text)
        if param in params:
            raise ValueError(
                f"--passk_param {text} sets {param} a second time: --{PARAM_FLAGS[param]} already gives "
                f"{params[param]!r}; keep one of them"
            )
        if param in estimator.inputs:
            raise ValueError(
                f"--passk_param {param}=... is not a setting: the {name!r} estimator gets {param} per step "
                f"({advantages.INPUTS[param]})"
            )
        params[param] = value
    if params.get("seed") is not None:
        params["seed"] = step_seed(params["seed"], step)

    schedule = getattr(args, "passk_k_schedule", "constant")
    k_required = "k" in accepted and inspect.signature(estimator.fn).parameters["k"].default is inspect.Parameter.empty
    if k_required and "k" not in params:
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
            **({} if args.passk_k_switch_at is None else {"switch_at": args.passk_k_switch_at}),
        )
    return {"estimator": name, "params": params, "inputs": estimator.inputs}


def settings(name: str) -> tuple[list[str], bool]:
    """The registry estimator's settings (its keyword parameters that are not per-step inputs), and whether
    it takes any keyword (**kwargs)."""
    estimator = advantages.spec(name)
    signature = inspect.signature(estimator.fn).parameters
    accepted = [
        p for p in list(signature)[1:] if signature[p].kind is not inspect.Parameter.VAR_KEYWORD
        and p not in estimator.inputs
    ]
    return accepted, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of training step `step`: a fixed seed alone would draw the same subsets every step.
    numpy's SeedSequence mixes (seed, step) so that nearby pairs give unrelated streams."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--passk_seed must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([seed, int(step)]).generate_state(1, np.uint64)[0] >> 1)


def needs_entropy(args: Any) -> str | None:
    """The estimator's name if it declares the `entropy` input (so the policy actors must capture it)."""
    name = estimator_name(args)
    return name if name is not None and "entropy" in advantages.spec(name).inputs else None
