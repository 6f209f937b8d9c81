"""Real local Ray (CPU) actors, in drivers that are separate scripts:

- an actor started through OpenRLHF's own RayActorGroup sees the passk estimator without importing
  openrlhf_passk: the `.pth` installed in .venv activates the hooks in the worker (the driver does not import
  our package either; the test compares its output with the registry);
- the k schedule's clock reaches the trainer actors, which Ray ships by value as the driver's class was
  when Ray wrapped it: the synchronous PPOTrainer and the async TrainingActor (--train.async_enable).
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
                         passk_k_switch_at=None, passk_num_groups=None, passk_seed=None, passk_reduce=None,
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


# A fresh interpreter that imports the ASYNC trainer module first, as `--train.async_enable` runs do (it imports
# ppo_trainer itself, before Ray wraps TrainingActor). Each trainer actor class is then created as a real Ray
# actor: Ray ships its modified_class by value, with the train_step it had in this driver. Its __init__ (which
# builds the models) is replaced in the shipped class by one that sets only what the clock needs; upstream's
# train_step then fails on the empty experience maker, after our wrapper has recorded the step.
STEP_CLOCK_DRIVER = textwrap.dedent(
    r"""
    import inspect, json, os, sys
    from types import SimpleNamespace

    def remove_the_base_patch():
        # Our patch function as if it lacked the BasePPOTrainer.train_step patch, in this process (before any
        # OpenRLHF import: the hooks look the function up then).
        from openrlhf_passk.integration import experience

        real = experience.patch_trainer

        def patch_trainer(module):
            original = module.BasePPOTrainer.train_step
            real(module)
            module.BasePPOTrainer.train_step = original

        experience.patch_trainer = patch_trainer


    # The Ray workers need it too: they import OpenRLHF (with the hooks) to unpickle what refers to it.
    mutant = sys.argv[1] == "without the BasePPOTrainer patch"
    if mutant:
        remove_the_base_patch()
    assert "openrlhf.trainer.ppo_trainer" not in sys.modules
    import openrlhf.trainer.ppo_trainer_async as trainer_async
    import ray
    from openrlhf.trainer.ppo_trainer import PPOTrainer


    def bare_init(self, *args, **kwargs):
        self.experience_maker = SimpleNamespace()


    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2,
             runtime_env={"worker_process_setup_hook": remove_the_base_patch} if mutant else None)
    try:
        clock = {}
        for actor_class in (trainer_async.TrainingActor, PPOTrainer):
            shipped = actor_class.__ray_metadata__.modified_class
            # Upstream's required arguments, as None: Ray checks the call against the signature it recorded.
            init = inspect.signature(shipped.__init__).parameters.values()
            named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            dummies = {p.name: None for p in init if p.name != "self" and p.kind in named and p.default is p.empty}
            shipped.__init__ = bare_init
            actor = actor_class.options(num_cpus=0).remote(**dummies)
            try:
                ray.get(actor.train_step.remote([], 7))
            except ray.exceptions.RayTaskError:
                pass  # upstream's body on the empty experience maker, after the clock
            clock[shipped.__name__] = ray.get(actor.__ray_call__.remote(
                lambda self: [os.getpid(), getattr(self.experience_maker, "_passk_global_step", None)]
            ))
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps({"driver_pid": os.getpid(), "clock": clock}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("patch", ["as shipped", "without the BasePPOTrainer patch"])
def test_the_step_clock_reaches_the_trainer_actors_that_ray_ships(patch, tmp_path, subprocess_env):
    """TrainingActor inherits train_step from BasePPOTrainer: only the BasePPOTrainer patch, applied before the
    async module wraps it, puts the clock into the class Ray ships. PPOTrainer is wrapped inside ppo_trainer's
    own body, before any patch: its own row patches the shipped class. Without the BasePPOTrainer patch (the
    second case, in the driver and in the workers, as if its row were gone) the async trainer's k would stay
    at its start, which this test catches."""
    driver = tmp_path / "step_clock.py"
    driver.write_text(STEP_CLOCK_DRIVER)
    env = {**subprocess_env, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    run = subprocess.run(
        [sys.executable, str(driver), patch], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert all(pid != result["driver_pid"] for pid, _ in result["clock"].values())  # in the Ray workers
    steps = {name: step for name, (_, step) in result["clock"].items()}
    expected_async = 7 if patch == "as shipped" else None
    assert steps == {"TrainingActor": expected_async, "PPOTrainer": 7}
