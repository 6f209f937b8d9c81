"""Our flags on OpenRLHF's `train_ppo_ray` command line, and their validation before anything starts (driver
only).

`extend_parser` adds them, the estimators' and SimKO's, to OpenRLHF's own parser (so their values travel
with `args` into the Ray workers, where `resolve.resolve` and `simko` read them); `validate` checks the whole
estimator setting once, for every k of the k schedule, with the estimator's own declarations
(`advantages.register`); `validate_simko` checks SimKO's.
"""

from __future__ import annotations

import argparse
from typing import Any

from openrlhf_passk import advantages, env
from openrlhf_passk.integration import upstream
from openrlhf_passk.integration.resolve import PARAM_FLAGS, estimator_name, resolve, settings
from openrlhf_passk.integration.reward_preflight import DEFAULT_WAIT_S

# The flags of the k schedule beyond --passk_k_schedule itself (None unless given); "step" only: switch_at.
SCHEDULE_FLAGS = ("passk_k_end", "passk_k_schedule_steps", "passk_k_switch_at")
# Flags that only make sense with one of our estimators (their defaults are None or the constant schedule).
OUR_FLAGS = (*PARAM_FLAGS.values(), "passk_param", *SCHEDULE_FLAGS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the openrlhf-passk flags (an argument group, so they show together in --help)."""
    group = parser.add_argument_group(
        "openrlhf-passk (Pass@k Training)",
        "Used when the advantage estimator is one of the openrlhf-passk estimators "
        f"({', '.join(advantages.available())}). {env.DRY_RUN}=1 validates the command and prints the "
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
        default=None,
        help="'step' schedule: fraction in [0, 1] of the steps after which k becomes --passk_k_end (default 0.5)",
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
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="before training, wait up to this long for an http(s) reward server's /health (0: no check). "
        "A .py reward file is always checked to load and define reward_func",
    )


def extend_parser(parser: argparse.ArgumentParser, layout: upstream.Layout) -> None:
    """Make every registry estimator a valid choice of OpenRLHF's estimator flag and add our flags."""
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
    add_simko_arguments(parser)


def validate(args: Any, layout: upstream.Layout) -> tuple[dict[str, Any] | None, list[str]]:
    """Check the estimator setting before anything starts. Returns (summary, warnings); ValueError naming the
    flag at fault."""
    n = upstream.arg(args, layout.n_samples_dest)
    schedule = getattr(args, "passk_k_schedule", "constant")
    name = estimator_name(args, layout)
    if name is None:
        given = [f"--{flag}" for flag in OUR_FLAGS if getattr(args, flag, None) is not None]
        if schedule != "constant":
            given.append("--passk_k_schedule")
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply to openrlhf-passk estimators, but {layout.estimator_flag} "
                f"is {upstream.arg(args, layout.estimator_dest)!r}; "
                f"choose one of {', '.join(advantages.available())}"
            )
        return None, []
    check_k_schedule(args, name, n, layout)
    params = resolve(args, layout, 0)["params"]
    estimator = advantages.spec(name)
    if n < 2:
        raise ValueError(f"{name} compares the rollouts of a prompt, so it needs {layout.n_samples_flag} >= 2, got {n}")
    k = getattr(args, "passk_k", None)
    if k is not None and not 1 <= k <= n:
        raise ValueError(f"--passk_k must satisfy 1 <= k <= {layout.n_samples_flag} ({n}); got k={k}")
    if schedule != "constant":
        ks = sorted({resolve(args, layout, s)["params"]["k"] for s in range(args.passk_k_schedule_steps + 1)})
    else:
        ks = [params.get("k")]
    penalties = length_penalties(args, layout)
    if estimator.binary and penalties:
        # OpenRLHF applies its length penalties between the reward function and the advantage: a correct
        # but long response scores e.g. 0.5, and the estimator would stop the run at its first step.
        raise ValueError(
            f"{name} needs 0/1 rewards, but {' and '.join(penalties)} turn(s) some rewards into other values "
            "after the reward function (OpenRLHF's length penalties), so training would stop at the first step. "
            f"Drop {' and '.join(f.split()[0] for f in penalties)}, or use an estimator that takes any reward "
            f"({', '.join(e for e in advantages.available() if not advantages.spec(e).binary)})"
        )

    import torch

    # One group per possible number of correct samples c = 0..N: finds the groups that learn nothing.
    pattern = (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1)).float()
    # The per-step inputs (one value per prompt, advantages.INPUTS) are known only at rollout time: each gets
    # zeros here, and the estimator's probe variants cover the cases an input can select.
    inputs = {i: torch.zeros(n + 1) for i in estimator.inputs}
    warnings, zero_counts = [], {}
    for k_value in ks:
        trial = {**params, "k": k_value} if k_value is not None else dict(params)
        try:
            if estimator.check is not None:
                estimator.check(n, trial)
            # The settings as given first (the estimator checks them), then its probe variants, if any.
            probes = [trial, *(estimator.probes(trial) if estimator.probes else [])]
            adv = [advantages.compute(name, pattern, **probe, **inputs) for probe in probes]
            adv = adv[1:] or adv
        except ValueError as exc:
            flags = ", ".join(f"--{PARAM_FLAGS.get(p, 'passk_param ' + p)} {v}" for p, v in trial.items())
            raise ValueError(f"{name} rejects its settings ({flags}; {layout.n_samples_flag} {n}): {exc}") from exc
        zero = [c for c in range(n + 1) if all(bool((a[c] == 0).all()) for a in adv)]
        zero_counts[k_value] = zero
        if len(zero) == n + 1:
            warnings.append(
                f"with k={k_value} and {n} samples per prompt, EVERY group's {name} advantage is 0 for 0/1 "
                "rewards: nothing will be learned at this k; lower --passk_k or raise the samples per prompt"
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
            **({"switch_at": args.passk_k_switch_at} if args.passk_k_switch_at is not None else {}),
            "k_values": sorted(ks, reverse=True),
        },
        "zero_advantage_correct_counts": {str(k): _ranges(v) for k, v in zero_counts.items()},
        "success_threshold": args.passk_success_threshold,
        "estimator_module": args.passk_estimator_module,
        "description": (estimator.fn.__doc__ or "").strip().split("\n\n")[0],
        "binary_rewards_only": estimator.binary,
        "inputs_per_step": {i: advantages.INPUTS[i] for i in estimator.inputs},
    }
    if params.get("seed") is not None:
        summary["seed"] = f"--passk_seed {args.passk_seed}: step s draws with SeedSequence([{args.passk_seed}, s])"
    return summary, warnings


def check_k_schedule(args: Any, name: str, n: int, layout: upstream.Layout) -> None:
    """The k schedule's flags, before the schedule is computed: each flag given is used by the schedule chosen,
    and in range (ValueError naming the flag)."""
    schedule = getattr(args, "passk_k_schedule", "constant")
    given = [f"--{flag}" for flag in SCHEDULE_FLAGS if getattr(args, flag, None) is not None]
    accepted, takes_any = settings(name)
    if "k" not in accepted and not takes_any and (given or schedule != "constant"):
        used = [f"--passk_k_schedule {schedule}"] * (schedule != "constant") + given
        raise ValueError(
            f"{' and '.join(used)}: the {name!r} estimator has no k to schedule (its parameters: "
            f"{', '.join(accepted) or 'none'}); drop {' and '.join(flag.split()[0] for flag in used)}"
        )
    if schedule == "constant" and given:
        raise ValueError(
            f"{' and '.join(given)} set the k schedule, but --passk_k_schedule is constant (k stays --passk_k): "
            f"add --passk_k_schedule {'step' if '--passk_k_switch_at' in given else 'linear or step'}, or drop "
            f"{' and '.join(given)}"
        )
    switch_at = getattr(args, "passk_k_switch_at", None)
    if switch_at is not None and schedule != "step":
        raise ValueError(
            f"--passk_k_switch_at is when the step schedule switches k, but --passk_k_schedule is {schedule}: "
            "use --passk_k_schedule step, or drop --passk_k_switch_at"
        )
    if switch_at is not None and not 0 <= switch_at <= 1:
        raise ValueError(
            f"--passk_k_switch_at must be a fraction of --passk_k_schedule_steps in [0, 1] (0.5, the default, "
            f"switches halfway), got {switch_at}"
        )
    for flag in ("passk_k_end", "passk_k_schedule_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    k_end = getattr(args, "passk_k_end", None)
    if k_end is not None and k_end > n:
        raise ValueError(f"--passk_k_end must satisfy 1 <= k <= {layout.n_samples_flag} ({n}); got {k_end}")


def add_simko_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the SimKO flags (same flat spelling on OpenRLHF 0.9.x and 0.11.x); simko.py reads them in the workers."""
    group = parser.add_argument_group("SimKO (openrlhf-passk)")
    group.add_argument("--simko", action="store_true", default=False, help="Enable SimKO (off by default)")
    group.add_argument("--simko_top_k", type=int, default=3, help="SimKO: number of top-K candidates")
    group.add_argument(
        "--simko_tau",
        type=float,
        default=0.8,
        help="SimKO: entropy quantile in [0, 1); tokens above it in their response are gated",
    )
    group.add_argument("--simko_alpha", type=float, default=0.01, help="SimKO: top-K mixing weight")
    group.add_argument("--simko_lambda", type=float, default=1.1, help="SimKO: top-1 penalty factor")
    group.add_argument(
        "--simko_correct_threshold",
        type=float,
        default=0.5,
        help="SimKO: a response is correct if its reward (before length penalties) is above this",
    )


def validate_simko(args: Any) -> None:
    """Raise ValueError naming the flag and the fix when the SimKO settings cannot work."""
    tau, k = args.simko_tau, args.simko_top_k
    alpha, lam = args.simko_alpha, args.simko_lambda
    if not 0.0 <= tau < 1.0:
        raise ValueError(
            f"--simko_tau must be in [0, 1), got {tau}: the gate keeps tokens whose entropy is above the "
            "tau-quantile of their response, so tau = 1 gates no token and silently turns SimKO off "
            "(use the default 0.8 = top 20% of tokens, or drop --simko)"
        )
    if k < 1:
        raise ValueError(f"--simko_top_k must be >= 1, got {k}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--simko_alpha must be in [0, 1] (top-K mixing weight), got {alpha}")
    if lam <= 0.0:
        raise ValueError(f"--simko_lambda must be > 0 (1 = no top-1 penalty, default 1.1), got {lam}")
    if args.simko:
        layout = upstream.layout()
        loss_type = upstream.setting(args, "policy_loss_type", layout) or "ppo"
        if loss_type != "ppo":
            flag = layout.flag("policy_loss_type")
            raise ValueError(f"--simko works on the token-level PPO loss; {flag} is {loss_type!r}: use ppo")


def length_penalties(args: Any, layout: upstream.Layout) -> list[str]:
    """The length-penalty flags in force that can make a 0/1 reward something else."""
    out = []
    buffer_len = upstream.setting(args, "overlong_buffer_len", layout)
    if buffer_len is not None and upstream.setting(args, "overlong_penalty_factor", layout) != 0:
        out.append(f"{layout.flag('overlong_buffer_len')} {buffer_len:g}")
    coef = upstream.setting(args, "stop_properly_penalty_coef", layout)
    if coef is not None and coef not in (0, 1):  # 0 maps a truncated 1 to 0, 1 changes nothing
        out.append(f"{layout.flag('stop_properly_penalty_coef')} {coef:g}")
    return out


def _ranges(values: list[int]) -> str:
    """[0, 25, 26, 27, 32] -> "0, 25-27, 32"."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


