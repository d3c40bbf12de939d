"""train.micro_batch_size: a batch cut into micro-batches whose gradients accumulate gives the
step of the whole batch, for every stage.

Two checks. On one batch of each stage (and of each variant whose loss reads the batch as a
whole: RLOO's groups, REINFORCE's baseline with the KL in the reward, online IQLearn's mixed
rows, dropped ties, DPG's prompt groups), the micro-batches' weighted losses add up to the
whole batch's loss, their gradients to its gradient, and their weighted figures to its figures
(relative 1e-5). Then through the loop: a step with micro_batch_size 1 or 2 ends with the
parameters, loss and gradient norm of a step on the whole batch (PPO with two epochs, two
updates, on its batch).

Tolerance: the micro-batches run the same arithmetic on fewer rows, so only the order of the
sums differs (and REINFORCE's baseline with the KL in the reward comes from a pass of its
own); measured (``pytest -s`` prints them), gradients agree within 1.7e-6 of each tensor's
largest entry, against 1e-5 asserted (the parameters: see LOOP).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tether.engine.loop as loop_module
from tether.config import RecipeError, load_recipe
from tether.engine.loop import train, weighted_stats
from tether.engine.setup import build_policy, prepare_models, seed_everything
from tether.stages.base import make_stage
from tether.stages.imitation import ImitationStage

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
HERE = Path(__file__).parent
NEW_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.max_positions=128"]

# stage variants: the overrides (INIT: model.init is the tiny checkpoint) and the rows per batch
CASES = {
    "mle": [*NEW_MODEL, "task.max_digits=2", "train.batch_size=5"],
    "mle-entropy": [
        *NEW_MODEL,
        "task.max_digits=2",
        "train.batch_size=5",
        "imitation.entropy_coef=0.1",
    ],
    "mle-smoothed": [
        *NEW_MODEL,
        "task.max_digits=2",
        "train.batch_size=5",
        "imitation.label_smoothing=0.1",
    ],
    "iqlearn": [
        *NEW_MODEL,
        "task.name=multistep",
        "task.max_digits=1",
        "train.stage=iqlearn",
        "train.batch_size=5",
        "imitation.lam=0.5",
    ],
    "iqlearn-online": [
        *NEW_MODEL,
        "task.name=multistep",
        "task.max_digits=1",
        "train.stage=iqlearn",
        "train.batch_size=6",
        "imitation.lam=0.5",
        "imitation.online_fraction=0.5",
    ],
    "rl-a2c": ["INIT", "task.name=first-digit", "train.stage=rl", "rl.prompts_per_step=5"],
    "rl-ppo": [
        "INIT",
        "task.name=first-digit",
        "train.stage=rl",
        "rl.algorithm=ppo",
        "rl.prompts_per_step=5",
    ],
    "rl-rloo": [
        "INIT",
        "task.name=first-digit",
        "train.stage=rl",
        "rl.algorithm=rloo",
        "rl.group_size=2",
        "rl.prompts_per_step=3",
        "rl.certainty_exponent=2",
    ],
    "rl-reinforce": [
        "INIT",
        "task.name=first-digit",
        "train.stage=rl",
        "rl.algorithm=reinforce",
        "rl.prompts_per_step=5",
        "rl.gamma=0.9",
        "rl.kl_estimator=k3",
    ],
    "rl-reinforce-kl-reward": [
        "INIT",
        "task.name=first-digit",
        "train.stage=rl",
        "rl.algorithm=reinforce",
        "rl.prompts_per_step=5",
        "rl.kl_placement=reward",
        "rl.kl_estimator=k1",
        "rl.kl_coef=0.5",
    ],
    "dpo": [
        "INIT",
        "task.name=multistep-prefs",
        "task.max_digits=1",
        "train.stage=dpo",
        "train.batch_size=5",
    ],
    "reward-model": [
        "INIT",
        "task.name=multistep-prefs",
        "task.max_digits=1",
        "train.stage=reward-model",
        "train.batch_size=5",
    ],
    "online-dpo": ["INIT", "task.name=first-digit", "train.stage=online-dpo", "train.batch_size=5"],
    "online-dpo-drop-ties": [
        "INIT",
        "task.name=first-digit",
        "train.stage=online-dpo",
        "train.batch_size=6",
        "preference.ties=drop",
        "preference.pair_with=policy",
        "reward.kind=python",
        f"reward.function={HERE / 'distributed' / 'varied_reward.py'}:coarse",
    ],
    "xpo": [
        "INIT",
        "task.name=first-digit",
        "train.stage=xpo",
        "train.batch_size=5",
        "preference.alpha=0.05",
    ],
    "dpg": [
        "INIT",
        "task.name=enumerable",
        "train.stage=dpg",
        "dpg.prompts_per_step=3",
        "dpg.samples_per_step=12",
    ],
    "dpg-js-batch-z": [
        "INIT",
        "task.name=enumerable",
        "train.stage=dpg",
        "dpg.prompts_per_step=3",
        "dpg.samples_per_step=9",
        "dpg.divergence=js",
        "dpg.log_z=batch",
    ],
}


def _recipe(case, init, *more):
    overrides = [f"model.init={init}" if o == "INIT" else o for o in CASES[case]]
    return load_recipe(None, [*overrides, *more])


def _stage(recipe):
    seed_everything(0)
    model, tokenizer = build_policy(recipe)
    stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
    prepare_models(model, stage, recipe, torch.device("cpu"))
    with torch.no_grad():  # off the reference, so that log-ratios and KLs are not all 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return stage, model


def _accumulate(stage, model, parts):
    """Σ w·loss, the accumulated gradients and the weighted figures of ``parts``."""
    params = [p for p in model.parameters() if p.requires_grad] + stage.parameters()
    for p in params:
        p.grad = None
    total, figures = 0.0, []
    for part in parts:
        w = 1.0 if part.share is None else part.share.weight
        loss, stats = stage.loss(model, part)
        (loss * w).backward()
        total += w * float(loss.detach())
        figures.append((w, stats))
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    return total, grads, weighted_stats(figures)


def _close(a, b):
    return abs(a - b) <= RTOL * max(1.0, abs(a))


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_add_up_to_the_whole_batch(case, tiny_checkpoint):
    stage, model = _stage(_recipe(case, tiny_checkpoint))
    batch = stage.next_batch()
    loss, grads, stats = _accumulate(stage, model, [batch])
    assert any(float(g.abs().max()) > 0 for g in grads)
    if case.endswith("drop-ties"):  # some pairs dropped, some kept
        assert 0 < stats["ties"] < 1
    for size in (1, 2):
        parts = stage.micro_batches(model, batch, size)
        assert len(parts) > 1 and abs(sum(p.share.weight for p in parts) - 1.0) < 1e-12
        micro_loss, micro_grads, micro_stats = _accumulate(stage, model, parts)
        assert _close(loss, micro_loss), (loss, micro_loss)
        # each tensor at its own scale; one whose gradient is 0 in exact arithmetic (a bias
        # that cancels in a difference) holds rounding noise: at the largest gradient's
        overall = max(float(g.abs().max()) for g in grads)
        errors = [
            float((g - h).abs().max()) / max(float(g.abs().max()), overall)
            for g, h in zip(grads, micro_grads, strict=True)
        ]
        print(f"{case}, micro_batch_size {size}: gradients within {max(errors):.1e}")  # -s
        assert max(errors) <= RTOL
        # the figures that are means over the batch's rows, pairs, groups or tokens
        keys = {
            "loss",
            "reward",
            "accuracy",
            "kl_exact",
            "entropy",
            "completion_tokens",
            "nll",
            "tokens",
            "frac_truncated",
            "frac_constant_groups",
            "kl_weight_mean",
            "preference_loss",
            "chosen_logp",
            "chosen_score",
            "ties",
            "kl_policy_ref",
            "value_loss",
            "td",
            "policy_tokens",
            "expert_tokens",
        } & stats.keys()
        assert "loss" in keys
        for key in keys:
            assert _close(stats[key], micro_stats[key]), (key, stats[key], micro_stats[key])


def test_a_batch_that_fits_is_not_cut(tiny_checkpoint):
    stage, model = _stage(_recipe("rl-rloo", tiny_checkpoint))
    batch = stage.next_batch()
    assert stage.micro_batches(model, batch, 6) == [batch]  # 3 groups of 2
    # a group is never split: micro_batch_size 1 still gives whole groups of 2 rows
    parts = stage.micro_batches(model, batch, 1)
    assert [p.input_ids.shape[0] for p in parts] == [2, 2, 2]


def test_online_iqlearn_micro_batches_hold_both_kinds_of_rows(tiny_checkpoint):
    stage, model = _stage(_recipe("iqlearn-online", tiny_checkpoint))
    batch = stage.next_batch()  # 3 demonstrations, 3 policy rows
    parts = stage.micro_batches(model, batch, 2)
    assert len(parts) == 3
    assert all(p.is_expert.any() and (~p.is_expert).any() for p in parts)


# ---------------------------------------------------------------- through the loop

# AdamW's step lr·m/(√v + ε) turns the rounding of a gradient entry about as small as ε into
# up to ~1e-3 of a step (measured: 1.3e-6 at lr 1e-3 on DPO's MLP); at lr 1e-4 that stays
# below 1e-5 of the weights, while a wrong gradient moves entries by up to a step, 1e-4
LOOP = [
    "train.steps=1",
    "train.log_every=1",
    "train.eval_every=1000",
    "eval.n=2",
    "optim.warmup_steps=0",
    "optim.lr=1e-4",
]
# one variant per stage, with several epochs per batch for PPO
LOOP_CASES = [
    ("mle", 1),
    ("iqlearn-online", 2),
    ("rl-ppo", 1),
    ("rl-rloo", 2),
    ("dpo", 2),
    ("reward-model", 1),
    ("online-dpo", 2),
    ("xpo", 1),
    ("dpg", 1),
]


@pytest.mark.parametrize(("case", "size"), LOOP_CASES)
def test_a_step_in_micro_batches_ends_where_the_whole_batch_does(
    case, size, tiny_checkpoint, tmp_path
):
    more = [*LOOP, "rl.ppo_epochs=2"]
    train(_recipe(case, tiny_checkpoint, *more), tmp_path / "whole", progress=False)
    micro = _recipe(case, tiny_checkpoint, *more, f"train.micro_batch_size={size}")
    train(micro, tmp_path / "micro", progress=False)
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "micro" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= RTOL * float(a[k].abs().max()), k

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    whole, cut = rows("whole"), rows("micro")
    assert [r["step"] for r in cut] == [1]
    for r, s in zip(whole, cut, strict=True):
        assert _close(r["loss"], s["loss"]) and _close(r["grad_norm"], s["grad_norm"])


def test_a_stage_that_cannot_split_refuses_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(ImitationStage, "splits_batches", False)
    recipe = load_recipe(None, [*CASES["mle"], *LOOP, "train.micro_batch_size=2"])
    with pytest.raises(RecipeError, match="^train.micro_batch_size: train.stage mle cannot split"):
        train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_ddp_synchronises_on_the_last_micro_batch_only(tmp_path, monkeypatch):
    """The loop enters accelerate's no_sync for every micro-batch but the last."""
    entered = []
    original = loop_module.Accelerator.no_sync

    def no_sync(self, model):
        entered.append(True)
        return original(self, model)

    monkeypatch.setattr(loop_module.Accelerator, "no_sync", no_sync)
    recipe = load_recipe(None, [*CASES["mle"], *LOOP, "train.micro_batch_size=2"])
    train(recipe, tmp_path / "run", progress=False)
    assert len(entered) == 2  # 5 rows in 3 micro-batches: the first two do not synchronise
