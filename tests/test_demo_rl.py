"""Demonstration-regularised RL (docs/methods.md §6): the label-smoothed MLE against hand and
closed-form values, the imitation stage unchanged at ε = 0, the enumerable task's expert, the
recipe errors, and `tether study demo-rl` end to end at a toy size."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tether.batches import collate_pairs
from tether.cli import app
from tether.config import RecipeError, load_recipe
from tether.engine.loop import train
from tether.engine.setup import build_policy
from tether.models.loading import char_tokenizer
from tether.objectives import (
    label_smoothed_mle_loss,
    mle_loss,
    shifted_token_logprobs,
    smoothed_token_loss,
)
from tether.stages.imitation import ImitationStage
from tether.tasks import FixedPool, task_from_config
from tether.tasks.enumerable import (
    EnumerableTask,
    best_answers,
    expert_distribution,
    expert_reward,
    score,
    stopped_answers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- the smoothing math


def test_smoothed_token_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]])  # p = [1/6, 2/6, 3/6]
    eps = 0.1
    got = smoothed_token_loss(logits, torch.tensor([2]), eps)
    by_hand = 0.9 * math.log(2.0) + 0.1 * (math.log(6.0) + math.log(3.0) + math.log(2.0)) / 3
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # log-softmax input gives the same value; ε = 0 is the plain NLL
    assert smoothed_token_loss(logits.log_softmax(-1), torch.tensor([2]), eps).item() == (
        pytest.approx(by_hand, rel=1e-6)
    )
    assert smoothed_token_loss(logits, torch.tensor([2]), 0.0).item() == pytest.approx(math.log(2))


def test_smoothed_loss_gradient_and_optimum():
    """∂ℓ/∂logits = softmax − q with q = (1−ε)·onehot + ε/V (checked by finite differences), so
    the optimum is π = q: π(target) = 1−ε+ε/V and every other token keeps ε/V."""
    torch.manual_seed(0)
    v, eps, target = 5, 0.2, torch.tensor([3])
    q = torch.full((v,), eps / v, dtype=torch.float64)
    q[3] += 1 - eps
    logits = torch.randn(1, v, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smoothed_token_loss(logits, target, eps).sum(), logits)
    assert torch.allclose(grad[0], logits.detach().softmax(-1)[0] - q, atol=1e-12)
    h = 1e-6
    for i in range(v):
        step = torch.zeros(1, v, dtype=torch.float64)
        step[0, i] = h
        up = smoothed_token_loss(logits.detach() + step, target, eps).item()
        down = smoothed_token_loss(logits.detach() - step, target, eps).item()
        assert (up - down) / (2 * h) == pytest.approx(grad[0, i].item(), abs=1e-7)
    # at logits = log q the gradient vanishes and the loss is the entropy of q (its minimum)
    at_q = q.log().unsqueeze(0).requires_grad_(True)
    loss = smoothed_token_loss(at_q, target, eps)
    (grad,) = torch.autograd.grad(loss.sum(), at_q)
    assert grad.abs().max().item() < 1e-12
    assert loss.item() == pytest.approx(-(q * q.log()).sum().item())
    # and plain gradient descent from random logits reaches it
    free = torch.randn(1, v, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([free], lr=1.0)
    for _ in range(2000):
        opt.zero_grad()
        smoothed_token_loss(free, target, eps).sum().backward()
        opt.step()
    pi = free.detach().softmax(-1)[0]
    assert pi[3].item() == pytest.approx(1 - eps + eps / v, abs=1e-6)
    assert pi[0].item() == pytest.approx(eps / v, abs=1e-6)


def test_label_smoothed_mle_loss_over_completion_tokens():
    torch.manual_seed(0)
    tok = char_tokenizer()
    batch = collate_pairs(tok, ["Digits:", "Digits:"], ["12", "3"])
    logits = torch.randn(*batch.input_ids.shape, len(tok))
    # ε = 0: bit for bit the plain MLE loss
    plain, _ = mle_loss(shifted_token_logprobs(logits, batch.input_ids), batch.loss_mask)
    zero, _ = label_smoothed_mle_loss(logits, batch.input_ids, batch.loss_mask, 0.0)
    assert torch.equal(plain, zero)
    # ε > 0: the token mean of the per-position loss, by hand over the completion tokens
    eps = 0.3
    loss, stats = label_smoothed_mle_loss(logits, batch.input_ids, batch.loss_mask, eps)
    terms = [
        smoothed_token_loss(logits[i, t - 1 : t], batch.input_ids[i, t : t + 1], eps)
        for i in range(2)
        for t in range(1, batch.input_ids.shape[1])
        if batch.loss_mask[i, t]
    ]
    assert len(terms) == 5  # "12"+EOS and "3"+EOS
    assert loss.item() == pytest.approx(torch.cat(terms).mean().item(), rel=1e-6)
    assert stats["nll"] == pytest.approx(plain.item(), rel=1e-6) and stats["tokens"] == 5
    assert loss.item() == pytest.approx((1 - eps) * stats["nll"] + eps * stats["uniform_ce"])


# ----------------------------------------------------------------------------- the imitation stage

TINY = [
    "task.name=enumerable",
    "task.demonstrations=expert",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.max_positions=32",
    "train.steps=4",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=4",
    "optim.warmup_steps=1",
    "eval.digits=[]",
    "eval.n=4",
]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage_at_zero_smoothing_is_mle_bit_for_bit(tmp_path):
    train(load_recipe(None, TINY), tmp_path / "mle", progress=False)
    train(load_recipe(None, [*TINY, "imitation.label_smoothing=0"]), tmp_path / "zero", False)
    a = load_file(tmp_path / "mle" / "model" / "model.safetensors")
    b = load_file(tmp_path / "zero" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in _rows(tmp_path / "mle") if "loss" in r]
    assert losses == [r["loss"] for r in _rows(tmp_path / "zero") if "loss" in r]
    # the stage's loss at ε = 0 is the plain MLE loss on the same batch, bit for bit
    recipe = load_recipe(None, TINY)
    torch.manual_seed(0)
    model, tok = build_policy(recipe)
    stage = ImitationStage(recipe, tok, model, torch.device("cpu"))
    batch = stage.next_batch()
    loss, _ = stage.loss(model, batch)
    t = batch.tokens
    logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask).logits
    assert torch.equal(loss, mle_loss(shifted_token_logprobs(logits, t.input_ids), t.loss_mask)[0])
    # ε > 0 trains differently and logs both parts
    train(load_recipe(None, [*TINY, "imitation.label_smoothing=0.1"]), tmp_path / "ls", False)
    last = [r for r in _rows(tmp_path / "ls") if "loss" in r][-1]
    assert last["loss"] != losses[-1] and last["nll"] > 0 and last["uniform_ce"] > 0
    assert last["loss"] == pytest.approx(0.9 * last["nll"] + 0.1 * last["uniform_ce"])


# ----------------------------------------------------------------------------- expert demonstrations


def test_expert_demonstrations():
    best = best_answers(3)
    assert len(best) == 11 and all(score(a, 3) == 1.0 for a in best)
    dist = expert_distribution(3)
    assert set(dist) == set(stopped_answers(3)) and len(dist) == 85
    assert sum(dist.values()) == pytest.approx(1.0)
    # E[r] = s + (1 − s)·E_uniform[r], the uniform writer enumerated independently
    uniform = sum(score(a, 3) / (4 * 4 ** len(a)) for a in stopped_answers(3))
    assert uniform == pytest.approx(0.421875)
    assert expert_reward(3) == pytest.approx(0.9 + 0.1 * uniform)
    assert expert_reward(3, 0.6) == pytest.approx(0.6 + 0.4 * uniform)
    # draws: every answer is in the space (stopped), best answers at about the share
    task = EnumerableTask(3, "expert", 0.6)
    rng = random.Random(0)
    draws = [task.pretrain_problem(rng).target for _ in range(4000)]
    assert all(d in dist for d in draws)
    share_best = sum(d in best for d in draws) / len(draws)
    expected = sum(dist6 for a, dist6 in expert_distribution(3, 0.6).items() if a in best)
    assert share_best == pytest.approx(expected, abs=0.03)
    mean_r = sum(score(d, 3) for d in draws) / len(draws)
    assert mean_r == pytest.approx(expert_reward(3, 0.6), abs=0.02)


def test_uniform_demonstrations_unchanged():
    """The default writer draws the same stream as before the expert existed."""
    rng, old = random.Random(7), random.Random(7)
    task = EnumerableTask(3)
    for _ in range(50):
        length = old.randint(0, 3)
        assert task.pretrain_problem(rng).target == "".join(
            old.choice("0123") for _ in range(length)
        )


def test_recipe_pair_loads_and_pools_expert_demos():
    bc = load_recipe("demo-bc-enumerable", ["task.train_size=16"])
    assert bc.train.stage == "mle" and bc.imitation.label_smoothing == 0.05
    pool = task_from_config(bc.task, bc.seed)
    assert isinstance(pool, FixedPool) and len(pool.problems) == 16
    assert all(p.target in expert_distribution(3) for p in pool.problems)
    rl = load_recipe("demo-rl-enumerable", ["model.init=somewhere"])
    assert rl.train.stage == "dpg" and rl.dpg.divergence == "reverse_kl"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stage=iqlearn", "imitation.label_smoothing=0.1"], "train.stage mle only"),
        (
            ["train.stage=dpg", "model.init=x", "imitation.label_smoothing=0.1"],
            "train.stage mle only",
        ),
        (["imitation.label_smoothing=1.0"], "imitation.label_smoothing"),
        (["imitation.label_smoothing=-0.1"], "imitation.label_smoothing"),
        (["imitation.label_smoothing=0.1", "imitation.entropy_coef=0.1"], "one of the two"),
        (["task.name=addition", "task.demonstrations=expert"], "needs task.name enumerable"),
        (["task.name=enumerable", "task.expert_share=0.5"], "demonstrations expert only"),
        (
            ["task.name=enumerable", "task.demonstrations=expert", "task.expert_share=1.5"],
            "task.expert_share",
        ),
        (["task.name=enumerable", "task.demonstrations=oracle"], "task.demonstrations"),
    ],
)
def test_recipe_errors_are_one_line(overrides, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(None, overrides)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the study

TOY = ["--num-demos", "4,16", "--betas", "0.1,1", "--expert-shares", "0.9", "--seeds", "1"]
TOY += ["--rl-seeds", "2", "--bc-steps", "4", "--rl-steps", "2", "--quiet"]


def test_study_demo_rl_end_to_end(tmp_path):
    out = tmp_path / "demo-rl"
    result = CliRunner().invoke(app, ["study", "demo-rl", "--out", str(out), *TOY])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "best β" in report and "| 16 |" in report and (out / "demo_rl.png").is_file()
    data = json.loads((out / "results.json").read_text())
    assert len(data["clones"]) == 2 and len(data["runs"]) == 2 * 2 * 2  # N_E × β × RL seeds
    for run in data["runs"]:
        assert 0 <= run["reward"] <= 1 and run["entropy"] > 0 and run["kl_policy_ref"] >= 0
    for row in data["summary"]["0.9"].values():
        assert row["best_beta"] in (0.1, 1.0) and row["clone"]["kl_expert_clone"] > 0
    # the clone is the RL's reference and starting point
    rl = load_recipe(out / "share-0.9" / "n4-s0" / "rl-b0.1-r0" / "config.yaml")
    assert rl.model.init == str(out / "share-0.9" / "n4-s0" / "bc" / "model")
    assert rl.dpg.beta == 0.1 and rl.train.stage == "dpg"
    # a second call reuses every finished run
    again = CliRunner().invoke(app, ["study", "demo-rl", "--out", str(out), *TOY])
    assert again.exit_code == 0 and "clone," not in again.output
    assert json.loads((out / "results.json").read_text())["runs"] == data["runs"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-demos", "8,x"], "--num-demos"),
        (["--betas", "0"], "dpg.beta"),
        (["--expert-shares", "1.5"], "task.expert_share"),
    ],
)
def test_study_demo_rl_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(app, ["study", "demo-rl", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x").exists()  # nothing trained
