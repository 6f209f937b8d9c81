"""`openrlhf-passk advantages`: list the registered estimators, or compute advantages for given rewards.

openrlhf-passk advantages
openrlhf-passk advantages --name passk --k 2 --rewards 1,0,0,1
openrlhf-passk advantages --name pkpo --k 2 --rewards "1,0,0,1;0.2,0.9,0.5,0.1" --param baseline=loo
openrlhf-passk advantages --name passk_adaptive --k 2 --rewards "1,0,0,1;1,0,0,0" --entropy 0.4,1.3
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="estimator to run (without --rewards: describe only this one)")
    parser.add_argument(
        "--rewards", help="rewards of one group as comma-separated numbers; separate groups with ';'"
    )
    parser.add_argument("--k", type=int, help="k of Pass@k (needed by every estimator except grpo)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra estimator parameter, repeatable (e.g. baseline=loo, num_groups=64, seed=0, reduce=sum)",
    )
    parser.add_argument(
        "--entropy",
        help="passk_adaptive: each group's mean response token entropy, comma-separated, one per group",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _value(text: str) -> int | float | str | None:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return None if text == "None" else text


def run(args: argparse.Namespace) -> int:
    import inspect
    import json

    import torch

    from openrlhf_passk import advantages

    try:
        names = [args.name] if args.name and advantages.get(args.name) else advantages.available()
        if args.rewards is None:
            if args.k is not None or args.param or args.entropy is not None:
                raise ValueError("--k, --param and --entropy need --rewards (the rewards to compute advantages for)")
            rows = []
            for name in names:
                fn = advantages.get(name)
                params = [
                    p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                    for p in list(inspect.signature(fn).parameters.values())[1:]
                ]
                doc = (inspect.getdoc(fn) or "").splitlines()
                rows.append({"name": name, "params": ", ".join(params), "doc": doc[0] if doc else ""})
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                width = max(len(r["name"]) for r in rows)
                for r in rows:
                    print(f"{r['name']:<{width}}  ({r['params']})\n{'':<{width}}  {r['doc']}")
            return 0

        if not args.name:
            raise ValueError("--rewards needs --name (one of: " + ", ".join(advantages.available()) + ")")
        try:
            groups = [[float(x) for x in group.split(",")] for group in args.rewards.split(";")]
        except ValueError:
            raise ValueError(
                f"--rewards must be comma-separated numbers, groups split by ';', got {args.rewards!r}"
            ) from None
        if len({len(g) for g in groups}) != 1:
            sizes = [len(g) for g in groups]
            raise ValueError(f"--rewards: every group needs the same number of rollouts, got sizes {sizes}")
        params = {}
        for item in args.param:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--param must look like KEY=VALUE, got {item!r}")
            params[key] = _value(text)
        if args.k is not None:
            params["k"] = args.k
        call_params = dict(params)
        if args.entropy is not None:
            try:
                entropy = [float(x) for x in args.entropy.split(",")]
            except ValueError:
                raise ValueError(f"--entropy must be comma-separated numbers, got {args.entropy!r}") from None
            if len(entropy) != len(groups):
                raise ValueError(f"--entropy needs one number per group ({len(groups)}), got {len(entropy)}")
            params["entropy"] = entropy
            call_params["entropy"] = torch.tensor(entropy, dtype=torch.float64)
        result = advantages.compute(args.name, torch.tensor(groups, dtype=torch.float64), **call_params)
    except ValueError as err:
        print(f"openrlhf-passk advantages: error: {err}", file=sys.stderr)
        return 2

    if args.json:
        print(
            json.dumps(
                {"name": args.name, "params": params, "rewards": groups, "advantages": result.tolist()}
            )
        )
    else:
        for group, adv in zip(groups, result.tolist(), strict=True):
            print("rewards:    " + " ".join(f"{x:>9.4g}" for x in group))
            print("advantages: " + " ".join(f"{x:>9.4f}" for x in adv))
    return 0
