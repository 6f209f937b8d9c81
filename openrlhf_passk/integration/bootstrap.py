"""Interpreter-start bootstrap, run by `openrlhf_passk_hook.pth` in every Python process of the environment:
the training driver (which parses the arguments) and every Ray worker alike, among them the PPOTrainer Ray
actor, where the experience maker computes the advantages and SimKO's fields.

`install()` only puts a tiny finder at the front of `sys.meta_path`; the finder ignores every module outside
the `openrlhf` package, so torch and OpenRLHF are not imported here and other programs pay nothing.
Importing this module does nothing by itself. `OPENRLHF_PASSK_DISABLE=1` turns the hooks off; then a dry run or
CPU mode asked for at the same time is dead, which the training CLI says in one line.
Standard library only (and our stdlib-only `env`).
"""

from __future__ import annotations

import sys

from openrlhf_passk import env


class PostImportFinder:
    """Meta-path finder that hands `openrlhf.*` lookups to `openrlhf_passk.integration.hooks`."""

    def find_spec(self, name, path=None, target=None):
        if name != "openrlhf" and not name.startswith("openrlhf."):
            return None
        from openrlhf_passk.integration import hooks

        return hooks.find_spec(self, name, path, target)


class DisabledFinder:
    """With OPENRLHF_PASSK_DISABLE on: patches nothing, and when the training CLI loads says once that the
    dry run / CPU mode variables set next to it have no effect (a "dry run" would otherwise launch for real)."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith("openrlhf."):
            return None
        from openrlhf_passk.integration import upstream

        if name == upstream.CLI_MODULE:
            dead = [v for v in (env.DRY_RUN, env.CPU) if env.env_flag(v)]
            if dead:
                print(
                    f"[openrlhf-passk] WARNING: {env.DISABLE} is on, so {' and '.join(dead)} "
                    f"{'has' if len(dead) == 1 else 'have'} no effect: "
                    "this is a plain OpenRLHF run (a real launch, no dry run, no CPU mode)",
                    file=sys.stderr,
                )
            sys.meta_path.remove(self)
        return None


def disabled() -> bool:
    return env.env_flag(env.DISABLE)


def installed() -> bool:
    return any(isinstance(finder, PostImportFinder) for finder in sys.meta_path)


def install(force: bool = False) -> bool:
    """Register the hooks (idempotent). `force` ignores OPENRLHF_PASSK_DISABLE (explicit entry point).

    OpenRLHF modules imported before this call are patched right away.
    """
    if installed():
        return True
    if disabled() and not force:
        if not any(isinstance(finder, DisabledFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, DisabledFinder())
        return False
    sys.meta_path.insert(0, PostImportFinder())
    if "openrlhf" in sys.modules:
        from openrlhf_passk.integration import hooks

        hooks.patch_loaded_modules()
    return True


def install_forced() -> None:
    """Ray `worker_process_setup_hook` of the explicit entry point (openrlhf_passk.train_ppo_ray)."""
    install(force=True)
