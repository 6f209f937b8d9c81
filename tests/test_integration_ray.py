"""A real local Ray (CPU) actor, started through OpenRLHF's own RayActorGroup, sees the passk estimator
without importing openrlhf_passk: the `.pth` installed in .venv activates the hooks in the worker.

The driver is a separate script (it must not import our package either); this test only compares its
output with the registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from openrlhf_passk import advantages
from openrlhf_passk.integration import upstream

DRIVER = textwrap.dedent(
    r"""
    import importlib.metadata, json, os, sys
    from types import SimpleNamespace

    import ray
    from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup

    REWARDS = json.loads(sys.argv[1])
    G, N, K = len(REWARDS), len(REWARDS[0]), int(sys.argv[2])


    class Probe(BaseModelActor):
        def probe(self):
            import torch
            from openrlhf.trainer.ppo_utils import experience_maker as em
            from openrlhf.trainer.ppo_utils.experience import Experience
            from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

            passk = dict(passk_k=K, passk_k_schedule="constant", passk_k_end=None,
                         passk_k_schedule_steps=None,
                         passk_k_switch_at=0.5, passk_num_groups=None, passk_seed=None, passk_reduce=None,
                         passk_baseline=None, passk_f=None, passk_param=None, passk_estimator_module=None,
                         passk_success_threshold=1.0, simko=False)
            if importlib.metadata.version("openrlhf").startswith("0.11"):
                args = SimpleNamespace(
                    rollout=SimpleNamespace(n_samples_per_prompt=N, max_new_tokens=8),
                    algo=SimpleNamespace(advantage=SimpleNamespace(estimator="passk", gamma=1.0, lambd=1.0,
                                                                   no_std_norm=False)),
                    reward=SimpleNamespace(clip_range=(-10, 10), overlong_buffer_len=None,
                                           stop_properly_penalty_coef=None),
                    data=SimpleNamespace(max_len=16), **passk)
            else:
                args = SimpleNamespace(n_samples_per_prompt=N, advantage_estimator="passk", gamma=1.0,
                                       lambd=1.0,
                                       no_advantage_std_norm=False, reward_clip_range=(-10, 10),
                                       overlong_buffer_len=None, stop_properly_penalty_coef=None, max_len=16,
                                       **passk)
            flat = [r for row in REWARDS for r in row]
            # Two micro-batches with the samples interleaved, as OpenRLHF's splitter can leave them.
            batches = [list(range(0, G * N, 2)), list(range(1, G * N, 2))]
            experiences = [
                Experience(
                    action_mask=torch.ones(len(idx), 4, dtype=torch.bool),
                    kl=torch.zeros(len(idx), 4),
                    rewards=torch.tensor([flat[i] for i in idx]),
                    response_length=torch.full((len(idx),), 4.0),
                    index=idx,
                    info={"reward": torch.tensor([flat[i] for i in idx])},
                )
                for idx in batches
            ]
            maker = em.RemoteExperienceMaker(None, None, None, None, FixedKLController(0.0),
                                             SimpleNamespace(args=args), None)
            out = maker.compute_advantages_and_returns(experiences)
            per_sample = {i: e.advantages[j, 0].item() for e in out for j, i in enumerate(e.index)}
            import openrlhf

            return {
                "openrlhf": [importlib.metadata.version("openrlhf"), openrlhf.__file__],
                "pid": os.getpid(),
                "main_file": getattr(sys.modules["__main__"], "__file__", None),
                "passk_modules": sorted(m for m in sys.modules if m.startswith("openrlhf_passk")),
                "advantages": [per_sample[i] for i in range(G * N)],
                "pass_at_k": [e.info["passk/pass@k"].tolist() for e in out],
            }


    # As OpenRLHF's train(): ray.init with env_vars, then actors through RayActorGroup (1 "GPU" per actor;
    # the GPU is declared to Ray only, nothing uses CUDA).
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=100 * 1024**2,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN"}})
    try:
        group = RayActorGroup(1, 1, ray.remote(Probe), pg=None, num_gpus_per_actor=1)
        result = ray.get(group.async_run_method(method_name="probe"))[0]
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps({"driver_pid": os.getpid(), **result}))
    """
)


@pytest.mark.slow
def test_ray_worker_gets_the_patched_estimator(tmp_path, subprocess_env):
    rewards = torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0]])
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**subprocess_env, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    # Absolute paths: the driver runs in a temporary directory (and `make` passes the 0.9.10 copy relative).
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    run = subprocess.run(
        [sys.executable, str(driver), json.dumps(rewards.tolist()), "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["pid"] != result["driver_pid"]  # really another process
    import openrlhf

    assert result["openrlhf"] == [upstream.openrlhf_version(), openrlhf.__file__]  # the version under test
    assert "default_worker" in (result["main_file"] or "")  # a Ray worker, not a fork of the driver
    # Only the .pth's bootstrap (and what the hooks loaded lazily) is there: the probe imported none of it.
    assert "openrlhf_passk.integration.bootstrap" in result["passk_modules"]
    expected = advantages.compute("passk", rewards, k=2).view(-1)
    assert torch.allclose(torch.tensor(result["advantages"]), expected, atol=1e-6)
