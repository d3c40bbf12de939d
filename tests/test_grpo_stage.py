"""``rl.algorithm: grpo`` in the RL stage: the recipe keys, the advantages taken once over the
whole rollout, prompt groups kept whole by minibatches and micro-batches (whose steps add up
to the whole rollout's under each of TRL's reductions), and a GRPO update on the shipped
``addition-n3`` that moves the policy toward its better completions."""

from dataclasses import replace

import pytest
import torch

from tether.config import load_recipe
from tether.engine.loop import weighted_stats
from tether.engine.setup import build_policy, make_optimizer, prepare_models, seed_everything
from tether.objectives import grpo_advantages
from tether.scoring import grouped_completion_logits
from tether.stages.base import make_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(init, *sets, task="task.name=first-digit"):
    return load_recipe(
        None,
        [
            f"model.init={init}",
            task,
            "train.stage=rl",
            "rl.algorithm=grpo",
            "rl.group_size=2",
            "rl.prompts_per_step=3",
            "rl.max_new_tokens=4",
            "rl.kl_estimator=k3",
            "rl.kl_coef=0.2",
            *sets,
        ],
    )


def _stage(recipe, nudge=0.05):
    seed_everything(0)
    model, tokenizer = build_policy(recipe)
    stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
    prepare_models(model, stage, recipe, torch.device("cpu"))
    with torch.no_grad():  # off the reference, so that the KL and its gradient are not 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(nudge * torch.randn_like(p))
    return stage, model


# ----------------------------------------------------------------------------- the recipe


def test_recipe_keys_defaults_and_refusals(tiny_checkpoint):
    from tether.config import RecipeError

    rl = _recipe(tiny_checkpoint).rl
    # TRL 1.16's defaults: one update per batch (num_iterations 1), group std, dapo reduction
    assert (rl.epochs, rl.scale_rewards, rl.grpo_loss) == (1, "group", "dapo")
    assert _recipe(tiny_checkpoint, "rl.ppo_epochs=3").rl.epochs == 3
    ppo = load_recipe(None, ["train.stage=rl", "rl.algorithm=ppo", f"model.init={tiny_checkpoint}"])
    assert ppo.rl.epochs == 4 and ppo.reads_sampler_logprobs
    # ρ = π_θ / π_old reads π_old where the policy changed since the collect; with one update
    # per collect π_old is the loss's own π_θ, detached (TRL's num_iterations 1)
    assert not _recipe(tiny_checkpoint).reads_sampler_logprobs
    assert _recipe(tiny_checkpoint, "rl.ppo_epochs=2").reads_sampler_logprobs
    assert _recipe(tiny_checkpoint, "rl.minibatches=2").reads_sampler_logprobs
    with pytest.raises(RecipeError, match="group_size >= 2"):
        _recipe(tiny_checkpoint, "rl.group_size=1")
    with pytest.raises(RecipeError, match="kl_placement loss"):
        _recipe(tiny_checkpoint, "rl.kl_placement=reward", "rl.kl_estimator=k1")
    with pytest.raises(RecipeError, match="grpo_loss"):
        _recipe(tiny_checkpoint, "rl.grpo_loss=bnpo")


# ----------------------------------------------------------------------------- the rollout


def test_advantages_are_taken_once_over_the_whole_rollout(tiny_checkpoint):
    stage, _ = _stage(_recipe(tiny_checkpoint, "rl.scale_rewards=batch", "rl.reward_wrong=0"))
    rollout = stage.next_batch()
    expected = grpo_advantages(rollout.seq_rewards, 2, "batch")
    assert torch.allclose(rollout.advantages, expected)
    # a minibatch keeps the whole rollout's advantages (the batch std is not its own)
    part = rollout.select(torch.tensor([4, 5]), None)
    assert torch.equal(part.advantages, rollout.advantages[4:])


@pytest.mark.parametrize("epochs", [1, 2])
def test_one_update_per_collect_takes_the_ratio_against_the_loss_own_log_probs(
    epochs, tiny_checkpoint
):
    """With one update per collect the sampling policy is the one being updated: ρ = 1 in
    value, π_θ/sg(π_θ) in gradient, whatever the rollout's stored log-probs say (so bf16 runs
    need no rescoring pass); with two epochs the stored ones are read."""
    stage, model = _stage(_recipe(tiny_checkpoint, f"rl.ppo_epochs={epochs}"))
    rollout = stage.next_batch()
    signs = torch.tensor([1.0, -1.0]).repeat(rollout.seq_rewards.shape[0] // 2)
    rollout = replace(rollout, advantages=signs)  # whatever the rewards were: A ≠ 0
    shifted = replace(rollout, old_logp=rollout.old_logp + 0.1)
    losses, grads = [], []
    for batch in (rollout, shifted):
        loss, _ = stage.loss(model, batch)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    same = bool(torch.equal(losses[0], losses[1])) and all(
        torch.equal(a, b) for a, b in zip(*grads, strict=True)
    )
    assert same == (epochs == 1)


def test_minibatches_keep_prompt_groups_whole(tiny_checkpoint):
    stage, _ = _stage(_recipe(tiny_checkpoint, "rl.minibatches=3", "rl.ppo_epochs=2"))
    rollout = stage.next_batch()
    parts = stage.updates(rollout)
    assert len(parts) == 6 and [p.input_ids.shape[0] for p in parts] == [2] * 6
    for p in parts:  # the two rows of a minibatch share their prompt
        assert torch.equal(p.input_ids[0, : p.prompt_len], p.input_ids[1, : p.prompt_len])


def _accumulate(stage, model, parts):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    total, figures = 0.0, []
    for part in parts:
        w = 1.0 if part.share is None else part.share.weight
        loss, stats = stage.loss(model, part)
        (loss * w).backward()
        total += w * float(loss.detach())
        figures.append((w, stats))
    return total, [p.grad.clone() for p in params], weighted_stats(figures)


@pytest.mark.parametrize(
    "sets",
    [
        ["rl.grpo_loss=grpo"],
        ["rl.grpo_loss=dr_grpo", "rl.scale_rewards=none"],
        ["rl.grpo_loss=dapo", "rl.scale_rewards=batch"],
    ],
)
def test_micro_batches_add_up_to_the_whole_rollout(sets, tiny_checkpoint):
    stage, model = _stage(_recipe(tiny_checkpoint, *sets))
    rollout = stage.next_batch()
    # rewards that differ within groups (a random model rarely gets first-digit right)
    rewards = torch.tensor([1.0, -1.0, 0.5, 0.5, -1.0, 2.0])
    rollout = replace(rollout, seq_rewards=rewards, advantages=stage._grpo_advantages(rewards))
    loss, grads, stats = _accumulate(stage, model, [rollout])
    parts = stage.micro_batches(model, rollout, 2)
    assert len(parts) == 3  # one prompt group each
    micro_loss, micro_grads, micro_stats = _accumulate(stage, model, parts)
    assert micro_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
    scale = max(float(g.abs().max()) for g in grads)
    assert scale > 0
    assert (
        max(float((g - h).abs().max()) for g, h in zip(grads, micro_grads, strict=True))
        <= 1e-5 * scale
    )
    for key in ("reward", "kl_penalty", "entropy", "clip_fraction"):
        assert micro_stats[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- it trains


def test_a_grpo_update_on_addition_n3_favours_the_better_completions():
    """One collect on the shipped model (4-digit problems, graded digit reward so that groups
    differ), then num_iterations = 2 GRPO updates: the advantage-weighted mean log-prob
    Σ_i A_i·mean_t log π(y_i,t) of the sampled completions rises, and the second update's
    ratios are off 1 (the clip is live)."""
    recipe = load_recipe(
        "critical-tokens",
        [
            "model.init=addition-n3",
            "train.stage=rl",
            "rl.algorithm=grpo",
            "rl.group_size=4",
            "rl.prompts_per_step=2",
            "rl.temperature=1.5",
            "rl.kl_estimator=k3",
            "rl.kl_coef=0.04",
            "rl.ppo_epochs=2",
            "rl.grpo_loss=grpo",
            "reward.kind=graded",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            "rl.entropy_coef=0",
        ],
    )
    stage, model = _stage(recipe, nudge=0.0)
    model.train()
    optimizer = make_optimizer(model, recipe)
    rollout = stage.next_batch()
    advantages = rollout.advantages
    assert advantages.abs().max() > 0, rollout.seq_rewards  # some group's rewards differ

    def weighted_logp():
        with torch.no_grad():
            logits = grouped_completion_logits(
                model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 1.5
            )
            ids = rollout.input_ids[:, rollout.prompt_len :]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
            mean = (logp * rollout.mask).sum(1) / rollout.mask.sum(1)
        return float((advantages * mean).sum())

    before = weighted_logp()
    parts = stage.updates(rollout)
    assert len(parts) == 2
    ratios = []
    for part in parts:
        loss, stats = stage.loss(model, part)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ratios.append(stats["ratio_mean"])
    assert ratios[0] == pytest.approx(1.0, abs=1e-3)  # on-policy: π_θ = π_old
    assert abs(ratios[1] - 1.0) > 1e-4
    assert weighted_logp() > before + 1e-3
