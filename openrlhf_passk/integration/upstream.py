"""Every OpenRLHF symbol this package patches or relies on, in one place, with the releases it was read on.

Nothing here imports OpenRLHF: it is plain data plus two small accessors, so the `.pth` bootstrap can
consult it at interpreter start. When a new OpenRLHF release is supported, re-read each symbol below in
that release, then add a layout entry.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
EXPERIENCE_MAKER_MODULE = "openrlhf.trainer.ppo_utils.experience_maker"
TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"

# Upstream symbol -> what we do with it. Checked on OpenRLHF 0.11.2 and 0.9.10 (same names in both).
PATCHED_SYMBOLS: dict[str, str] = {
    f"{CLI_MODULE} (run as __main__)": (
        "its `if __name__ == '__main__'` block builds an argparse parser with a closed estimator choices "
        "list; argparse.ArgumentParser.parse_args is wrapped while that module loads, and acts only on the "
        "parser that defines the estimator flag: it extends the choices, adds our flags, validates, then "
        "restores the original parse_args"
    ),
    f"{CLI_MODULE}.train (in the __main__ namespace)": (
        "replaced by a printer of the resolved configuration only when OPENRLHF_PASSK_DRY_RUN=1"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.RemoteExperienceMaker.compute_advantages_and_returns": (
        "wrapped: built-in estimators call the original unchanged; ours run the original's group_norm "
        "per-token path with the registry's (G, N) advantages in place of the group_norm step"
    ),
    f"{EXPERIENCE_MAKER_MODULE}.apply_length_penalties (module global)": (
        "rebound to a wrapper that calls the original, then (only inside one of our estimators' calls) "
        "swaps each Experience.rewards for the registry advantages: the seam between length penalties "
        "and the group step"
    ),
    f"{TRAINER_MODULE}.BasePPOTrainer.train_step": (
        "wrapped to record its global_step argument on the experience maker (the step the k schedule "
        "reads; restored from the checkpoint when resuming)"
    ),
}

# Read, not patched: Experience.index / .rewards / .info / .action_mask, and args.<flags> in LAYOUTS.
READ_SYMBOLS = (
    f"{EXPERIENCE_MAKER_MODULE}.Experience fields index, rewards, info",
    f"{TRAINER_MODULE}.BasePPOTrainer.experience_maker",
)


@dataclass(frozen=True)
class Layout:
    """Flag spellings of one OpenRLHF release (argparse dests; 0.11 groups them with dots)."""

    estimator_dest: str
    estimator_flag: str
    n_samples_dest: str
    n_samples_flag: str
    builtin_estimators: tuple[str, ...]
    # Extra spellings of the estimator flag we accept (the mission writes --advantage_estimator).
    estimator_aliases: tuple[str, ...] = ()


LAYOUTS: dict[str, Layout] = {
    "0.11.2": Layout(
        estimator_dest="algo.advantage.estimator",
        estimator_flag="--algo.advantage.estimator",
        n_samples_dest="rollout.n_samples_per_prompt",
        n_samples_flag="--rollout.n_samples_per_prompt",
        builtin_estimators=(
            "gae",
            "reinforce",
            "rloo",
            "reinforce_baseline",
            "group_norm",
            "dr_grpo",
            "flash_reinforce",
        ),
        estimator_aliases=("--advantage_estimator",),
    ),
    "0.9.10": Layout(
        estimator_dest="advantage_estimator",
        estimator_flag="--advantage_estimator",
        n_samples_dest="n_samples_per_prompt",
        n_samples_flag="--n_samples_per_prompt",
        builtin_estimators=("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo"),
    ),
}
SUPPORTED_VERSIONS = tuple(LAYOUTS)


class UnsupportedVersion(RuntimeError):
    pass


def openrlhf_version() -> str | None:
    """Version of the OpenRLHF that `import openrlhf` finds (metadata is searched in sys.path order)."""
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def layout(version: str | None = None) -> Layout:
    version = openrlhf_version() if version is None else version
    if version not in LAYOUTS:
        raise UnsupportedVersion(
            f"openrlhf-passk supports OpenRLHF {' and '.join(SUPPORTED_VERSIONS)}, found "
            f"{version or 'none'}: install one of them (pip install openrlhf=={SUPPORTED_VERSIONS[0]}), "
            "or set OPENRLHF_PASSK_DISABLE=1 to run OpenRLHF without the passk extension"
        )
    return LAYOUTS[version]


def arg(args: Any, dest: str) -> Any:
    """Read an argparse dest from a flat Namespace ("algo.advantage.estimator" as one name) or from
    OpenRLHF 0.11's hierarchized args (args.algo.advantage.estimator)."""
    if hasattr(args, dest):
        return getattr(args, dest)
    value = args
    for part in dest.split("."):
        value = getattr(value, part)
    return value
