"""Interpreter-start bootstrap, imported by `openrlhf_passk_hook.pth` in every Python process of the
environment: the training driver (which parses the arguments) and every Ray worker alike, among them the
PPOTrainer Ray actor, where the experience maker computes the advantages and SimKO's fields.

It only puts a tiny finder at the front of `sys.meta_path`; the finder ignores every module outside
the `openrlhf` package, so torch and OpenRLHF are not imported here and other programs pay nothing.
`OPENRLHF_PASSK_DISABLE=1` turns it off. Standard library only.
"""

from __future__ import annotations

import os
import sys

DISABLE_ENV = "OPENRLHF_PASSK_DISABLE"


class PostImportFinder:
    """Meta-path finder that hands `openrlhf.*` lookups to `openrlhf_passk.integration.hooks`."""

    def find_spec(self, name, path=None, target=None):
        if name != "openrlhf" and not name.startswith("openrlhf."):
            return None
        from openrlhf_passk.integration import hooks

        return hooks.find_spec(self, name, path, target)


def env_flag(name: str) -> bool:
    """The one rule for every on/off variable of openrlhf-passk: unset, "", 0, false, no, off (any case,
    surrounding spaces ignored) mean off; any other value means on."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def disabled() -> bool:
    return env_flag(DISABLE_ENV)


def installed() -> bool:
    return any(isinstance(finder, PostImportFinder) for finder in sys.meta_path)


def install(force: bool = False) -> bool:
    """Register the hooks (idempotent). `force` ignores OPENRLHF_PASSK_DISABLE (explicit entry point).

    OpenRLHF modules imported before this call are patched right away.
    """
    if installed():
        return True
    if disabled() and not force:
        return False
    sys.meta_path.insert(0, PostImportFinder())
    if "openrlhf" in sys.modules:
        from openrlhf_passk.integration import hooks

        hooks.patch_loaded_modules()
    return True


def install_forced() -> None:
    """Ray `worker_process_setup_hook` of the explicit entry point (openrlhf_passk.train_ppo_ray)."""
    install(force=True)


install()
