"""`python -m openrlhf_passk.train_ppo_ray ...`: OpenRLHF's `train_ppo_ray` with the passk hooks installed
explicitly, for environments where the `.pth` file is not installed or is disabled. Same arguments as
`python -m openrlhf.cli.train_ppo_ray`.

Ray workers do not run this file, so without the `.pth` they get the hooks through Ray's
`worker_process_setup_hook`, added to the runtime_env of OpenRLHF's `ray.init` call.
"""

from __future__ import annotations

import runpy
import sys

from openrlhf_passk.integration import bootstrap, upstream

WORKER_HOOK = "openrlhf_passk.integration.bootstrap.install_forced"


def main() -> None:
    bootstrap.install(force=True)
    import ray

    original_init = ray.init

    def init(*args, **kwargs):
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env.setdefault("worker_process_setup_hook", WORKER_HOOK)
        kwargs["runtime_env"] = runtime_env
        return original_init(*args, **kwargs)

    ray.init = init
    sys.argv[0] = upstream.CLI_MODULE
    runpy.run_module(upstream.CLI_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
