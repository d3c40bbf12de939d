"""``train.sampler: vllm``: rollouts drawn by vLLM, log-probs recomputed by the policy.

A ``vllm.LLM`` is built once, from a snapshot of the policy (``save_pretrained`` into a
temporary folder: the architecture, the tokenizer, the first weights), inside this process and
on the same GPU as training (``train.vllm_gpu_memory`` is the share of GPU memory it takes).
Before each rollout the live weights are copied into vLLM's model in place, as TRL's GRPO
"colocate" mode does it: ``load_weights`` on the model of the in-process executor (vLLM's
``external_launcher`` keeps it in this process), then ``reset_prefix_cache``, since cached KV
blocks were computed with the old weights.

vLLM returns token ids only (no log-probs, no text): the prompts go in as the token ids the
tokenizer gives (as :func:`tether.generation.sampler.sample` encodes them), each request has its own
seed drawn from the stage's generator (so repeated prompts get different samples and a
resumed run draws the same seeds), generation stops at the tokenizer's EOS only (as the hf
sampler does), and the texts are decoded by the tokenizer. The log-probs are then recomputed
by one forward pass of the policy (:func:`tether.scoring.rescore`), so ``old_logp`` and DPG's
log q are those of the arithmetic the loss uses, not of vLLM's kernels. The result is the same
:class:`~tether.generation.sampler.SampleOutput` the hf sampler returns.

vLLM runs in bf16 with ``train.precision: bf16`` and in fp32 otherwise. Only the policy's
samples come from vLLM; the frozen reference's (XPO's second response, CTRL's calibration
samples, DPG's moment fit) come from the hf sampler.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

import torch
from torch import nn

from tether.config import RecipeError
from tether.generation.rollouts import Draw, RolloutBackend
from tether.generation.sampler import SampleOutput, _encode, pad_id, stop_token_ids
from tether.models.lora import is_lora

INSTALL_HINT = "pip install vllm, on a machine with a CUDA GPU"


def import_vllm() -> Any:
    """The vllm module, or a one-line RecipeError naming the config field and the install."""
    try:
        import vllm
    except ImportError:
        raise RecipeError(
            f"train.sampler vllm: the vllm package is not installed ({INSTALL_HINT}); "
            "or use train.sampler hf"
        ) from None
    return vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launcher_env() -> None:
    """vLLM's ``external_launcher`` reads the torch.distributed variables a launcher sets
    (``accelerate launch`` sets them for each process); a plain single process has none."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def pack_samples(
    tokenizer: Any,
    prompts: list[list[int]],
    completions: list[list[int]],
    finished: list[bool],
    device: torch.device,
) -> SampleOutput:
    """Token lists as :func:`tether.generation.sampler.sample` lays them out: prompts left-padded,
    completions right-padded, texts decoded with special tokens skipped; log-probs 0 (the
    caller fills them)."""
    pad = pad_id(tokenizer)
    B = len(prompts)
    P = max((len(p) for p in prompts), default=0)
    T = max((len(c) for c in completions), default=0)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.full((B, T), pad, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, P - len(p) :] = 1
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = 1
    return SampleOutput(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        logprobs=torch.zeros(B, T, dtype=torch.float32, device=device),
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True) if B else [],
        finished=list(finished),
    )


class VLLMRolloutBackend(RolloutBackend):
    """The policy's rollouts from a colocated ``vllm.LLM`` (module docstring); the log-probs
    are always the policy's own."""

    rescore = True

    def __init__(self, recipe: Any, policy: nn.Module, tokenizer: Any, device: torch.device):
        vllm = import_vllm()
        if is_lora(policy):
            raise RecipeError(
                "train.sampler vllm: a LoRA (PEFT) policy cannot be served yet; use "
                "train.sampler hf"
            )
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.device = device
        stops = stop_token_ids(tokenizer, policy)
        self.eos_ids = [] if stops is None else stops.tolist()
        # the snapshot vLLM reads its architecture and tokenizer from; kept for the run
        self.snapshot = tempfile.TemporaryDirectory(prefix="tether-vllm-")
        policy.save_pretrained(self.snapshot.name)  # type: ignore[operator]
        tokenizer.save_pretrained(self.snapshot.name)
        _launcher_env()
        self.llm = vllm.LLM(
            model=self.snapshot.name,
            dtype="bfloat16" if recipe.train.precision == "bf16" else "float32",
            gpu_memory_utilization=recipe.train.vllm_gpu_memory,
            distributed_executor_backend="external_launcher",  # the engine in this process
            seed=recipe.seed,
        )

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        """Copy ``model``'s weights into vLLM's model in place and drop its prefix cache."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((name, p.detach()) for name, p in model.named_parameters())
        self.llm.reset_prefix_cache()

    def draw(self, model: nn.Module, prompts: list[str], how: Draw) -> SampleOutput:
        if how.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 with vLLM, got {how.max_new_tokens}")
        self.sync_weights(model)
        encoded = _encode(self.tokenizer, prompts)
        seeds: list[int | None] = [None] * len(encoded)
        if how.generator is not None:
            drawn = torch.randint(
                0, 2**62, (len(encoded),), generator=how.generator, device=how.generator.device
            )
            seeds = [int(s) for s in drawn.tolist()]
        # stop at the ids the hf sampler stops at (the tokenizer's EOS and the generation
        # config's), and nowhere else
        stops = {"ignore_eos": True, "stop_token_ids": self.eos_ids} if self.eos_ids else {}
        allowed = how.allowed_token_ids
        params = [
            self.vllm.SamplingParams(
                temperature=how.temperature,
                max_tokens=how.max_new_tokens,
                seed=seed,
                allowed_token_ids=None if allowed is None else [int(t) for t in allowed],
                detokenize=False,
                **stops,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        results = self.llm.generate(requests, params, use_tqdm=False)
        completions = [list(r.outputs[0].token_ids) for r in results]
        finished = [r.outputs[0].finish_reason == "stop" for r in results]
        return pack_samples(self.tokenizer, encoded, completions, finished, self.device)
