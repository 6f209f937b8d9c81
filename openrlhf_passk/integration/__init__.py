"""OpenRLHF integration: the only part of openrlhf_passk that touches OpenRLHF internals.

Every process: `bootstrap` (run by the installed `openrlhf_passk_hook.pth`) registers a lazy import hook;
`hooks` patches OpenRLHF modules as they are imported, with the patch functions that `upstream.TABLE` names
(the table of every upstream symbol we touch, with the flag spellings of each supported release); `env`-driven
modes bring `standins` (a missing vllm / flash_attn) and `cpu_mode` / `hf_engine` (OPENRLHF_PASSK_CPU).

The training driver only: `preflight` (parse, validate, dry run or reward wait), `flags` (our flags and their
validation), `reward_preflight` (the reward source checks before Ray), `cluster` (joining a Ray cluster), and
the `doctor` command.

The Ray workers (the patches): `experience` (the estimators in the experience maker, the k schedule's clock),
`simko` (SimKO and the rollout-time entropy), `reward` (a failed reward call stops the run); `resolve` (the
estimator and its parameters at a step) runs in the workers and, once per step of the schedule, in the driver.

This file stays empty so that the bootstrap import is cheap.
"""
