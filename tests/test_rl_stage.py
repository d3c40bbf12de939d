"""The RL stage end to end on tiny models: the reward rises, and the prioritised path with all
weights 1 is the standard path."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tether.config import load_recipe
from tether.engine.loop import train


def _recipe(init, *overrides):
    return load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={init}",
            "train.stage=rl",
            "train.log_every=1",
            "train.eval_every=1000",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
            "eval.n=16",
            *overrides,
        ],
    )


# 12 steps in which every algorithm raises the reward by more than 0.2
EASY = [
    "rl.group_size=4",
    "rl.prompts_per_step=16",
    "rl.temperature=1.0",
    "rl.kl_coef=0.01",
    "rl.reward_wrong=0.0",
    "optim.lr=0.03",
    "train.steps=12",
    "rl.ppo_epochs=2",
]


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "a2c", "ppo", "grpo"])
def test_reward_rises_on_an_easy_task(algorithm, tiny_checkpoint, tmp_path):
    recipe = _recipe(tiny_checkpoint, f"rl.algorithm={algorithm}", *EASY)
    train(recipe, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    assert all(
        "kl_sampled" in r and "kl_exact" in r and "entropy" in r for r in rows if "reward" in r
    )


def test_prioritized_with_unit_weights_equals_standard_bit_for_bit(tiny_checkpoint, tmp_path):
    """certainty_exponent = 0 gives w = Ĵ^0 = 1 everywhere: the same run, bit for bit."""
    common = [
        "rl.algorithm=a2c",
        "rl.prompts_per_step=8",
        "train.steps=3",
        "rl.kl_coef=1.0",
        "optim.lr=0.01",
    ]
    train(_recipe(tiny_checkpoint, *common), tmp_path / "standard", progress=False)
    train(
        _recipe(tiny_checkpoint, *common, "rl.certainty_exponent=0"),
        tmp_path / "prioritized",
        progress=False,
    )

    def losses(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows if '"loss"' in r]

    assert losses("standard") == losses("prioritized")
    a = load_file(tmp_path / "standard" / "model" / "model.safetensors")
    b = load_file(tmp_path / "prioritized" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_on_addition_runs_and_logs_the_probe(tiny_checkpoint, tmp_path):
    recipe = load_recipe(
        None,
        [
            "task.max_digits=1",
            f"model.init={tiny_checkpoint}",
            "train.stage=rl",
            "train.steps=1",
            "rl.prompts_per_step=2",
            "rl.max_new_tokens=8",
            "rl.certainty_exponent=150",
            "rl.kl_estimator=exact",
            "eval.digits=[1, 2]",
            "eval.n=2",
        ],
    )
    train(recipe, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert (
        rows[0]["step"] == 0 and "eval/acc_identical_2" in rows[0] and "eval/p_critical" in rows[0]
    )
    step = next(r for r in rows if "reward" in r)
    assert 0.0 <= step["kl_weight_mean"] <= 1.0 and "kl_exact" in step


def test_the_summary_gives_the_held_out_gain_paired_by_problem(tiny_checkpoint, tmp_path):
    """The first (step 0) and last evaluation judge the same held-out problems; the summary's
    gain is the mean of the per-problem differences, its interval that of a paired t-interval,
    and the stage's reward is logged beside the accuracy."""
    from tether.eval.stats import paired_difference_ci

    recipe = load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={tiny_checkpoint}",
            "train.stage=rl",
            "train.steps=2",
            "optim.lr=0.05",
            "rl.prompts_per_step=4",
            "rl.max_new_tokens=2",
            "eval.n=8",
            "eval.temperature=1.0",
        ],
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    first = next(r for r in rows if r["step"] == 0)
    assert {"eval/acc_rl", "eval/reward"} <= set(first)
    gain = summary["eval/acc_rl"] - first["eval/acc_rl"]
    assert summary["eval/acc_rl_gain"] == pytest.approx(gain, abs=1e-12)
    low, high = summary["eval/acc_rl_gain_ci_low"], summary["eval/acc_rl_gain_ci_high"]
    assert low <= gain <= high
    # the reward (checker ±1) is an affine map of accuracy: its gain is twice the accuracy's
    assert summary["eval/reward_gain"] == pytest.approx(2 * gain, abs=1e-12)
    assert paired_difference_ci([0, 1, 1, 0], [1, 1, 0, 1])[0] == pytest.approx(0.25)


def test_minibatches_are_steps_on_shuffled_shares_of_the_rollout(tiny_checkpoint):
    """rl.minibatches 2: the rollout's rows shuffled and cut in two, each a batch of its own
    (no share: its own token mean), every row in exactly one minibatch per epoch; RLOO keeps
    prompt groups whole; more minibatches than rows is one line."""
    from tether.config import RecipeError
    from tether.engine.setup import build_policy
    from tether.stages.base import make_stage

    def stage_of(*sets):
        recipe = load_recipe(
            None,
            [
                f"model.init={tiny_checkpoint}",
                "task.name=first-digit",
                "train.stage=rl",
                "rl.prompts_per_step=4",
                "rl.max_new_tokens=2",
                *sets,
            ],
        )
        model, tok = build_policy(recipe)
        return make_stage(recipe, tok, model, torch.device("cpu"))

    stage = stage_of("rl.algorithm=a2c", "rl.minibatches=2")
    rollout = stage.next_batch()
    parts = stage.updates(rollout)
    assert len(parts) == 2 and all(p.share is None for p in parts)
    ids = torch.cat([p.input_ids for p in parts])
    assert ids.shape == rollout.input_ids.shape  # every row once
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, rollout.input_ids.tolist()))

    stage = stage_of(
        "rl.algorithm=rloo", "rl.group_size=2", "rl.minibatches=2", "rl.prompts_per_step=2"
    )
    parts = stage.updates(stage.next_batch())
    # each minibatch is one whole prompt group: its two rows share the prompt
    assert [p.input_ids.shape[0] for p in parts] == [2, 2]
    for p in parts:
        assert torch.equal(p.input_ids[0, : p.prompt_len], p.input_ids[1, : p.prompt_len])

    stage = stage_of("rl.algorithm=ppo", "rl.ppo_epochs=2", "rl.minibatches=2")
    assert len(stage.updates(stage.next_batch())) == 4  # 2 epochs × 2 minibatches
    stage = stage_of("rl.minibatches=5")
    with pytest.raises(RecipeError, match="rl.minibatches 5: the rollout has only 4 rows"):
        stage.updates(stage.next_batch())


def test_a_step_with_minibatches_takes_one_optimizer_step_each_and_logs_the_whole_rollout(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """rl.minibatches 2 with 8 rows: two Adam steps per loop step, and the logged reward is the
    mean over the whole rollout (the two halves' mean), not the last minibatch's."""
    from tether.stages.rl import RLStage

    steps, rewards = [], []
    original_step = torch.optim.AdamW.step
    original_loss = RLStage.loss

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    def recording_loss(self, model, batch):
        loss, stats = original_loss(self, model, batch)
        rewards.append(float(batch.seq_rewards.mean()))
        return loss, stats

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(RLStage, "loss", recording_loss)
    recipe = _recipe(
        tiny_checkpoint,
        "rl.algorithm=a2c",
        "rl.minibatches=2",
        "rl.prompts_per_step=8",
        "rl.reward_wrong=0.0",
        "rl.temperature=1.0",
        "optim.lr=0.03",
        "train.steps=3",
    )
    train(recipe, tmp_path / "run", progress=False)
    assert len(steps) == 6  # 3 loop steps × 2 minibatches
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r["reward"] for r in rows if "reward" in r]
    halves = list(zip(rewards[0::2], rewards[1::2], strict=True))
    assert logged == pytest.approx([(a + b) / 2 for a, b in halves])
    assert any(a != b for a, b in halves), halves  # the mean is not the last half's


def test_the_certainty_over_the_tasks_characters(tiny_checkpoint):
    """rl.certainty_support task: the reference's certainty with every logit outside the
    scratchpad's characters and EOS at −inf, normalised by log |A|: the weights equal those
    computed by hand from the masked logits; a task without an alphabet is one line."""
    import math

    from tether.config import RecipeError
    from tether.engine.setup import build_policy
    from tether.objectives.common import certainty
    from tether.scoring import grouped_completion_logits
    from tether.stages.base import make_stage
    from tether.tasks.addition import ALPHABET

    sets = [
        f"model.init={tiny_checkpoint}",
        "task.max_digits=1",
        "train.stage=rl",
        "rl.prompts_per_step=2",
        "rl.max_new_tokens=6",
        "rl.certainty_exponent=3",
        "rl.certainty_form=max_prob",
        "rl.certainty_normalization=vocabulary",
        "rl.certainty_support=task",
    ]
    recipe = load_recipe(None, sets)
    model, tok = build_policy(recipe)
    stage = make_stage(recipe, tok, model, torch.device("cpu"))
    rollout = stage.next_batch()
    ids = [tok.get_vocab()[ch] for ch in ALPHABET] + [tok.eos_token_id]
    assert stage.certainty_support.tolist() == sorted(set(ids))
    logits = grouped_completion_logits(
        stage.reference, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 1.0
    )
    masked = torch.full_like(logits, -math.inf)
    masked[..., sorted(set(ids))] = logits[..., sorted(set(ids))]
    # by hand: Ĵ = 1 + log max p_4 / log |A|, p_4 = softmax over the allowed logits / 4
    p = torch.softmax(masked / 4.0, dim=-1)
    by_hand = (1 + p.amax(-1).log() / math.log(len(set(ids)))).clamp(0, 1) ** 3
    mask = rollout.mask > 0
    assert torch.allclose(rollout.kl_weights[mask], by_hand[mask], rtol=1e-5)
    assert torch.allclose(certainty(masked, "max_prob") ** 3, by_hand, rtol=1e-5)
    with pytest.raises(RecipeError, match="rl.certainty_support task: this task writes open"):
        recipe = load_recipe(None, [*sets, "task.name=first-digit"])
        make_stage(recipe, tok, model, torch.device("cpu"))
