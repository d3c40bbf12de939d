"""train.precision bf16 on CPU (CPU autocast supports bf16): forward passes in bf16, log-probs,
KL and losses in fp32, weights and optimizer state fp32; bf16 runs of the rl and mle stages
train."""

import copy
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from test_rl_stage import EASY
from test_rl_stage import _recipe as rl_recipe
from tether.config import RecipeError, load_recipe
from tether.engine.checkpoints import TRAINER_STATE
from tether.engine.loop import train
from tether.engine.precision import autocast_forward
from tether.models.loading import load_frozen_reference, load_model_and_tokenizer
from tether.objectives import token_logprobs
from tether.objectives.common import log_softmax_and_token_logprobs
from tether.scoring import grouped_completion_logits
from tether.stages.rl import RLStage
from tether.tasks import AdditionTask

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers near |x| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


@pytest.mark.parametrize(
    "device",
    [
        CPU,
        pytest.param(
            torch.device("cuda"),
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_bf16_logits_are_upcast_and_logprobs_stay_close_to_fp32(device):
    """The shipped addition model (trained, logits up to ~23): under bf16 the forward's logits
    are bf16, token_logprobs upcasts them before the log-softmax (so it returns fp32, equal to
    scoring the same logits cast to fp32 first), and the log-probs stay within two bf16 ulps of
    the largest logit of the fp32 run (a logit near 20 is rounded to a multiple of 0.125), and
    within 0.01 on average."""
    model, tok = load_model_and_tokenizer("addition-n3", device=device)
    rng = random.Random(0)
    task = AdditionTask(3)
    texts = [(p.prompt + p.target) for p in (task.pretrain_problem(rng) for _ in range(32))]
    batch = tok(texts, padding=True, return_tensors="pt").to(device)
    ids, real = batch["input_ids"], batch["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        logits32 = model(**batch).logits
        autocast_forward(model, "bf16", device)
        logits16 = model(**batch).logits
    assert logits32.dtype == torch.float32 and logits16.dtype == torch.bfloat16
    lp32 = token_logprobs(logits32[:, :-1], ids[:, 1:])
    lp16 = token_logprobs(logits16[:, :-1], ids[:, 1:])
    assert lp16.dtype == torch.float32
    assert torch.equal(lp16, token_logprobs(logits16[:, :-1].float(), ids[:, 1:]))
    diff = (lp16 - lp32).abs()[real]
    assert float(diff.max()) <= 2 * bf16_ulp(float(logits32.abs().max()))
    assert float(diff.mean()) <= 0.01
    # the weights themselves are untouched: fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_autocast_forward_is_idempotent_and_follows_a_deepcopy(tiny_checkpoint):
    """DPG's adaptive proposal is a deepcopy of the policy: its forward must use its own
    weights, still under autocast."""
    model = load_frozen_reference(str(tiny_checkpoint))
    autocast_forward(model, "bf16", CPU)
    autocast_forward(model, "bf16", CPU)  # no second wrapper
    ids = torch.tensor([[5, 6, 7, 8]])
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(2.0)
        out, out_copy = model(input_ids=ids).logits, copied(input_ids=ids).logits
    assert out.dtype == out_copy.dtype == torch.bfloat16
    assert not torch.equal(out, out_copy)
    fp32 = load_frozen_reference(str(tiny_checkpoint))
    autocast_forward(fp32, "fp32", CPU)  # fp32: left alone
    assert fp32(input_ids=ids).logits.dtype == torch.float32


def test_frozen_linear_weights_keep_their_bf16_cast_with_the_same_outputs_and_gradients(
    tiny_checkpoint,
):
    """A LoRA policy under bf16 autocast with cache_frozen_casts: logits and the adapters'
    gradients are exactly those of plain autocast; the frozen weights are cast once, not at
    every pass; a frozen weight changed in place (its version bumped) is cast again, and
    trainable weights and passes outside autocast never use the cache."""
    from tether.engine import precision
    from tether.engine.setup import build_policy

    recipe = load_recipe(None, [f"model.init={tiny_checkpoint}", "model.lora.r=4"])
    plain, _ = build_policy(recipe)
    cached = copy.deepcopy(plain)
    for model in (plain, cached):
        autocast_forward(model, "bf16", CPU)
    precision.cache_frozen_casts(cached, "bf16", CPU)
    precision.cache_frozen_casts(cached, "bf16", CPU)  # idempotent
    ids = torch.randint(3, 90, (3, 11), generator=torch.Generator().manual_seed(0))
    switched = [m for m in cached.modules() if getattr(m, precision._CACHED, False)]
    assert switched and all(type(m) is torch.nn.Linear for m in switched)

    def run(model):
        logits = model(input_ids=ids).logits
        trained = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(logits.float().square().sum(), trained)
        return logits, grads

    for _ in range(2):
        expected, got = run(plain), run(cached)
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1], strict=True))
    frozen = [m for m in switched if not m.weight.requires_grad]
    casts = [getattr(m, precision._CACHE)[1] for m in frozen]
    run(cached)
    assert all(getattr(m, precision._CACHE)[1] is c for m, c in zip(frozen, casts, strict=True))
    # a frozen weight changed in place: cast again, outputs follow
    for model in (plain, cached):
        layer = next(m for m in model.modules() if type(m) is torch.nn.Linear)
        with torch.no_grad():
            layer.weight.mul_(1.5)
    assert torch.equal(run(cached)[0], run(plain)[0])
    # trainable layers and passes outside autocast: nn.Linear's own forward
    trainable = [m for m in switched if m.weight.requires_grad]
    assert trainable and all(getattr(m, precision._CACHE, None) is None for m in trainable)
    x = torch.randn(2, frozen[0].in_features)
    assert torch.equal(
        frozen[0](x), torch.nn.functional.linear(x, frozen[0].weight, frozen[0].bias)
    )


def _rl_recipe(init, *overrides):
    return rl_recipe(init, "train.precision=bf16", *overrides)


def test_bf16_rl_rollout_logprobs_are_the_losses_own(tiny_checkpoint):
    """With bf16 the rollout's old log-probs are recomputed by the policy's bf16 forward, and
    policy and reference go through the same arithmetic: before any update, old_logp, the
    loss's log π and log π_ref are the same numbers (PPO's ratio is 1, the KL is 0)."""
    recipe = _rl_recipe(tiny_checkpoint, "rl.algorithm=ppo", "rl.prompts_per_step=8")
    policy, tok = load_model_and_tokenizer(str(tiny_checkpoint))
    policy.train()
    stage = RLStage(recipe, tok, policy, CPU)
    for model in (policy, stage.reference):
        autocast_forward(model, "bf16", CPU)
    rollout = stage.next_batch()
    logits = grouped_completion_logits(
        policy,
        rollout.input_ids,
        rollout.attention_mask,
        rollout.prompt_len,
        recipe.rl.temperature,
    )
    completion_ids = rollout.input_ids[:, rollout.prompt_len :]
    logp = log_softmax_and_token_logprobs(logits, completion_ids)[1] * rollout.mask
    assert rollout.old_logp.dtype == rollout.ref_logp.dtype == torch.float32
    assert torch.equal(rollout.old_logp, logp)
    assert torch.equal(rollout.ref_logp * rollout.mask, logp)
    _, stats = stage.loss(policy, rollout)
    assert stats["kl_sampled"] == 0.0


def test_bf16_rl_run_trains_and_keeps_fp32_state(tiny_checkpoint, tmp_path):
    recipe = _rl_recipe(tiny_checkpoint, "rl.algorithm=rloo", *EASY, "train.checkpoint_every=6")
    train(recipe, tmp_path / "run", progress=False)
    steps = [r for r in rows(tmp_path / "run") if "reward" in r]
    rewards = [r["reward"] for r in steps]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert steps[0]["kl_sampled"] == 0.0  # policy = reference, same bf16 arithmetic
    assert all(math.isfinite(r["loss"]) for r in steps)
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step-000006" / TRAINER_STATE, weights_only=False
    )
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values()]
    assert moments and all(v.dtype == torch.float32 for v in moments if v.is_floating_point())
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


MLE = [
    "task.name=addition",
    "task.max_digits=2",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_positions=64",
    "train.steps=30",
    "train.batch_size=16",
    "train.log_every=1",
    "train.eval_every=1000",
    "optim.lr=0.01",
    "optim.warmup_steps=0",
    "eval.digits=[]",
    "eval.n=4",
]


def test_bf16_mle_run_trains_like_fp32(tmp_path):
    """The same run in fp32 and bf16: the first loss (same weights, same batch) agrees to bf16
    rounding, and the bf16 run's loss falls as the fp32 run's does."""
    train(load_recipe(None, MLE), tmp_path / "fp32", progress=False)
    train(load_recipe(None, [*MLE, "train.precision=bf16"]), tmp_path / "bf16", progress=False)
    loss32 = [r["loss"] for r in rows(tmp_path / "fp32") if "loss" in r]
    loss16 = [r["loss"] for r in rows(tmp_path / "bf16") if "loss" in r]
    assert loss16[0] != loss32[0] and abs(loss16[0] - loss32[0]) < 0.02
    assert sum(loss16[-5:]) / 5 < sum(loss16[:5]) / 5 - 0.5, loss16
    assert abs(sum(loss16[-5:]) - sum(loss32[-5:])) / 5 < 0.1


def test_precision_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"train\.precision: must be fp32 or bf16.*fp16"):
        load_recipe(None, ["train.precision=fp16"])


def test_bf16_with_lora_starts_at_zero_kl_and_updates_the_adapters(tiny_checkpoint, tmp_path):
    """LoRA's reference is the policy with its adapters off: under bf16 both go through the
    same autocast forward, so the first step's sampled KL is exactly 0; the run then moves the
    adapters (the merged model/ differs from model.init) with finite losses throughout."""
    recipe = _rl_recipe(tiny_checkpoint, "rl.algorithm=rloo", *EASY, "model.lora.r=8")
    train(recipe, tmp_path / "run", progress=False)
    steps = [r for r in rows(tmp_path / "run") if "reward" in r]
    assert steps[0]["kl_sampled"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["kl_sampled"] != 0.0
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    base = load_file(tiny_checkpoint / "model.safetensors")
    moved = [k for k in base if "proj" in k and not torch.equal(base[k], trained[k])]
    assert moved and all(trained[k].dtype == torch.float32 for k in trained)


def test_bf16_sampling_runs_bf16_matmuls_and_stays_close_to_the_autocast_forward():
    """sample(dtype=bf16) on the fp32 shipped model: the fast Llama runner in bf16 (fp32
    residual stream) and the model's own forward under bf16 autocast (the generic runner)
    draw the same greedy tokens on nearly every row, with log-probs within a few bf16 ulps of
    the largest logit of each other; both differ from fp32 sampling, whose weights stay fp32."""
    from tether.generation.sampler import sample

    model, tok = load_model_and_tokenizer("addition-n3")
    rng = random.Random(1)
    prompts = [AdditionTask(3).pretrain_problem(rng).prompt for _ in range(16)]
    kw = dict(max_new_tokens=40, temperature=0.0)
    fast = sample(model, tok, prompts, dtype=torch.bfloat16, **kw)
    generic = sample(model, tok, prompts, dtype=torch.bfloat16, fast=False, **kw)
    fp32 = sample(model, tok, prompts, **kw)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    same = [
        torch.equal(a, b) for a, b in zip(fast.completion_ids, generic.completion_ids, strict=True)
    ]
    assert sum(same) >= 14, same  # a near-tie may flip under a different op order
    both = (fast.completion_mask * generic.completion_mask).bool()
    for i in (i for i, s in enumerate(same) if s):
        gap = (fast.logprobs[i] - generic.logprobs[i]).abs()[both[i]]
        assert float(gap.max()) <= 4 * bf16_ulp(20.0)
    # bf16 is not fp32: some log-prob moves (the arithmetic did change)
    assert not torch.equal(fast.logprobs, fp32.logprobs)


def test_bf16_on_a_cpu_without_bf16_units_warns_in_one_line(monkeypatch):
    from tether.engine import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 units") as caught:
        precision.check_precision("bf16", CPU)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.check_precision("bf16", CPU)  # bf16 units: nothing to say
        precision.check_precision("fp32", CPU)
