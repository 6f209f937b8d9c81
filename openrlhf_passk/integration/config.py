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
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openrlhf_passk import advantages
from openrlhf_passk.integration import reward, upstream
from openrlhf_passk.integration.bootstrap import env_flag

DRY_RUN_ENV = "OPENRLHF_PASSK_DRY_RUN"
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
# The registry parameter that is not a flag: each prompt's mean response token entropy, captured in the
# policy's rollout-time forward (simko.py) for estimators that declare it.
ENTROPY_PARAM = "entropy"
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
    group.add_argument(
        "--passk_seed",
        type=int,
        default=None,
        help="passk_bootstrap: RNG seed (>= 0); each training step draws with a seed derived from it and the step",
    )
    group.add_argument("--passk_reduce", choices=["mean", "sum"], default=None, help="passk_bootstrap: mean|sum")
    group.add_argument("--passk_baseline", choices=["none", "loo", "loo-1"], default=None, help="pkpo: baseline")
    group.add_argument("--passk_f", type=str, default=None, help="passk_exceed: weight f(N_pos) ('linear')")
    group.add_argument(
        "--passk_adaptive_split",
        type=float,
        default=None,
        help="passk_adaptive: share of prompts in [0, 1] (default 0.5) that get the Pass@1 (grpo) advantage: "
        "those whose responses have the highest mean token entropy under the policy at rollout time; the "
        "others get the Pass@k advantage",
    )
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
    if ENTROPY_PARAM in params:
        raise ValueError(
            f"--passk_param {ENTROPY_PARAM}=... is not a setting: the {name!r} estimator gets each prompt's "
            "entropy from the policy's rollout-time forward"
        )
    if params.get("seed") is not None:
        params["seed"] = step_seed(params["seed"], step)

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
    return {"estimator": name, "params": params, "needs_entropy": ENTROPY_PARAM in signature}


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of training step `step`: a fixed seed alone would draw the same subsets every step.
    numpy's SeedSequence mixes (seed, step) so that nearby pairs give unrelated streams."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--passk_seed must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([seed, int(step)]).generate_state(1, np.uint64)[0] >> 1)


def entropy_estimator(args: Any) -> str | None:
    """The estimator's name if it takes the rollout entropy (so the policy actors must capture it)."""
    layout = upstream.layout()
    name = upstream.arg(args, layout.estimator_dest)
    if name in layout.builtin_estimators:
        return None
    load_estimator_module(getattr(args, "passk_estimator_module", None))
    return name if ENTROPY_PARAM in inspect.signature(advantages.get(name)).parameters else None


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
        probes = [trial]
        if resolved["needs_entropy"]:
            # The real entropies are known only at rollout time. With a split, probe both arms (all
            # Pass@k, all Pass@1): a group learns nothing only if it gets 0 whichever arm it lands in.
            probes = [{**trial, ENTROPY_PARAM: torch.zeros(n + 1)}]
            if "split" in inspect.signature(advantages.get(name)).parameters:
                probes += [{**probes[0], "split": 0.0}, {**probes[0], "split": 1.0}]
        try:
            adv = [advantages.compute(name, pattern, **probe) for probe in probes]
        except ValueError as exc:
            raise ValueError(f"{name} rejects its parameters {trial}: {exc}") from exc
        penalties = _length_penalties(args)
        if penalties:
            # OpenRLHF applies its length penalties between the reward function and the advantage: a
            # correct but long response scores e.g. 0.5. Estimators defined only for 0/1 rewards would
            # fail at the first step, after Ray, vLLM and the models have started: refuse now.
            try:
                advantages.compute(name, pattern * 0.5, **probes[0])
            except ValueError as exc:
                raise ValueError(
                    f"{name} needs 0/1 rewards, but {' and '.join(penalties)} turn(s) some rewards into other "
                    f"values after the reward function (OpenRLHF's length penalties), so training would stop "
                    f"at the first step ({exc}). Drop {' and '.join(f.split()[0] for f in penalties)}, or use "
                    "an estimator that takes any reward (passk, passk_full, passk_bootstrap, pkpo)"
                ) from exc
        arms = adv[1:] or adv  # the two arms' probes when there are, else the one probe
        zero = [c for c in range(n + 1) if all(bool((a[c] == 0).all()) for a in arms)]
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
    if params.get("seed") is not None:
        summary["seed"] = f"--passk_seed {args.passk_seed}: step s draws with SeedSequence([{args.passk_seed}, s])"
    if resolved["needs_entropy"]:
        summary["entropy"] = (
            "each prompt's entropy = mean over its responses of the mean token entropy over the response "
            "tokens, from the policy's forward at rollout time (captured in the PPO policy Ray actors; "
            "SimKO's loss stays off unless --simko)"
        )
        if name == "passk_adaptive":
            split = params.get("split", inspect.signature(advantages.passk_adaptive).parameters["split"].default)
            summary["adaptive_split"] = split
            summary["adaptive_rule"] = (
                f"per step, the round(G * {split}) prompts with the highest entropy get the Pass@1 (grpo) "
                "advantage, the others the Pass@k advantage; logged as passk/adaptive_pass1_frac and "
                "passk/adaptive_entropy_split"
            )
    return summary, warnings


# (OpenRLHF 0.11 dest, 0.9 dest) of the settings the checks below read; each flag is "--" + dest.
_DESTS = {
    "model": ("actor.model_name_or_path", "pretrain"),
    "reward_model": ("reward.model_name_or_path", "reward_pretrain"),
    "critic_model": ("critic.model_name_or_path", "critic_pretrain"),
    "data": ("data.prompt_dataset", "prompt_data"),
    "input_key": ("data.input_key", "input_key"),
    "label_key": ("data.label_key", "label_key"),
    "overlong_buffer_len": ("reward.overlong_buffer_len", "overlong_buffer_len"),
    "overlong_penalty_factor": ("reward.overlong_penalty_factor", "overlong_penalty_factor"),
    "stop_properly_penalty_coef": ("reward.stop_properly_penalty_coef", "stop_properly_penalty_coef"),
    "actor_nodes": ("actor.num_nodes", "actor_num_nodes"),
    "actor_gpus": ("actor.num_gpus_per_node", "actor_num_gpus_per_node"),
    "ref_nodes": ("ref.num_nodes", "ref_num_nodes"),
    "ref_gpus": ("ref.num_gpus_per_node", "ref_num_gpus_per_node"),
    "critic_nodes": ("critic.num_nodes", "critic_num_nodes"),
    "critic_gpus": ("critic.num_gpus_per_node", "critic_num_gpus_per_node"),
    "reward_nodes": ("reward.num_nodes", "reward_num_nodes"),
    "reward_gpus": ("reward.num_gpus_per_node", "reward_num_gpus_per_node"),
    "engines": ("vllm.num_engines", "vllm_num_engines"),
    "tp": ("vllm.tensor_parallel_size", "vllm_tensor_parallel_size"),
    "colocate_all": ("train.colocate_all", "colocate_all_models"),
    "colocate_actor_ref": ("train.colocate_actor_ref", "colocate_actor_ref"),
    "colocate_critic_reward": ("train.colocate_critic_reward", "colocate_critic_reward"),
    "async": ("train.async_enable", "async_train"),
    "kl": ("algo.kl.init_coef", "init_kl_coef"),
    "rollout_batch": ("rollout.batch_size", "rollout_batch_size"),
    "train_batch": ("train.batch_size", "train_batch_size"),
    "epochs": ("train.max_epochs", "max_epochs"),
}


def _get(args: Any, key: str) -> tuple[Any, str]:
    """(value, flag) of a setting under either version's spelling; (None, 0.11 flag) when absent."""
    for dest in _DESTS[key]:
        try:
            return upstream.arg(args, dest), f"--{dest}"
        except AttributeError:
            continue
    return None, f"--{_DESTS[key][0]}"


def _length_penalties(args: Any) -> list[str]:
    """The length-penalty flags in force that can make a 0/1 reward something else."""
    out = []
    buffer_len, flag = _get(args, "overlong_buffer_len")
    if buffer_len is not None and _get(args, "overlong_penalty_factor")[0] != 0:
        out.append(f"{flag} {buffer_len:g}")
    coef, flag = _get(args, "stop_properly_penalty_coef")
    if coef is not None and coef not in (0, 1):  # 0 maps a truncated 1 to 0, 1 changes nothing
        out.append(f"{flag} {coef:g}")
    return out


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
    for key in ("model", "reward_model", "critic_model"):
        value, flag = _get(args, key)
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
    data, data_flag = _get(args, "data")
    input_key, input_flag = _get(args, "input_key")
    label_key, label_flag = _get(args, "label_key")
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
    dry_run = env_flag(DRY_RUN_ENV)
    reward_value = upstream.arg(ns, layout.reward_dest)
    try:
        # OpenRLHF itself only fails on a missing model once Ray and the GPUs are up.
        if not upstream.arg(ns, layout.model_dest):
            raise ValueError(f"{layout.model_flag} is required: the policy model to train (a local path or a hub id)")
        summary, warnings = validate(ns, layout)
        simko.validate(ns)
        if ns.passk_reward_wait < 0:
            raise ValueError(f"--passk_reward_wait must be >= 0 seconds (0: no check), got {ns.passk_reward_wait}")
        input_report, input_warnings = check_inputs(ns)
        reward_report, reward_warnings = reward.check_sources(reward_value, layout.reward_flag, dry_run)
    except ValueError as exc:
        parser.error(str(exc))
    warnings += input_warnings + reward_warnings
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
    urls = [s for s in reward.sources(reward_value) if reward.is_http(s)]
    if not urls:
        return
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == upstream.CLI_MODULE:
        main.train = reward.wrap_train(main.train, urls, wait_s, flag)
    else:  # parse_args called from elsewhere: wait now
        reward.wrap_train(lambda args: None, urls, wait_s, flag)(None)


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
    value = {key: _get(args, key)[0] for key in _DESTS}
    flag = {key: _get(args, key)[1] for key in _DESTS}
    layout = upstream.layout()
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
        return ",".join(reward.redact(u) for u in value.split(","))
    return value
