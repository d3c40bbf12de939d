"""The DPG / f-DPG stage on the enumerable task, checked against exact enumeration: the sampled
policy is the enumerated one; the stage's gradient estimates average to the exact gradients
(within 4 standard errors); reverse KL is KL-RL on the stage's own samples and in expectation;
DPG moves a policy toward p* ∝ π_ref·exp(r/β); resume is exact; recipes and `tether eval
--exact` fail in one line; `tether train` and `tether eval --exact` run end to end."""

import copy
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from test_reliability import assert_resume_is_exact
from tether.cli import app
from tether.config import RecipeError, load_recipe
from tether.distributions.enumeration import exact_space
from tether.distributions.exact import expectation, jensen_shannon, kl, total_variation
from tether.engine.loop import train
from tether.generation.sampler import sample
from tether.models.loading import build_model, load_model_and_tokenizer
from tether.objectives import reinforce_loss, rloo_baseline
from tether.rewards.functions import GradedReward, RewardError
from tether.stages.dpg import DPGStage
from tether.tasks import get_task
from tether.tasks.enumerable import EnumerableTask, space_size

TIMING = {"tokens_per_s", "elapsed_s", "peak_rss_mb"}  # not the same from run to run


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the models are tiny and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recipe(init, *overrides):
    return load_recipe(
        None,
        [
            "task.name=enumerable",
            f"model.init={init}",
            "train.stage=dpg",
            "train.log_every=1",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
            *overrides,
        ],
    )


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


# ---------------------------------------------------------------- the task and its sampling


def test_enumerable_task_space_and_reward():
    task = get_task("enumerable", 3)
    assert isinstance(task, EnumerableTask) and task.max_new_tokens() == 4
    assert space_size(3) == 1 + 4 + 16 + 64 + 256 == 341
    # four checks, a quarter each: contains 1, contains 2, a 1 before a 2, stopped (≤ 3 digits)
    assert [task.score(None, t) for t in ("", "0", "1", "21", "12", "1233", "x12")] == [
        0.25,
        0.25,
        0.5,
        0.75,
        1.0,
        0.75,
        0.0,
    ]
    assert task.is_correct(None, "312") and not task.is_correct(None, "3120")
    with pytest.raises(ValueError, match="task.max_digits 8: .*349525 responses"):
        EnumerableTask(8)


def test_sampling_stays_in_the_vocabulary_and_is_the_enumerated_policy(tiny_checkpoint):
    model, tok = load_model_and_tokenizer(str(tiny_checkpoint))
    space = exact_space(get_task("enumerable", 3), tok)
    dist = space.distribution(model)
    assert len(dist) == 341 and abs(dist.mass - 1) < 1e-5
    assert sorted(set(space.reward.tolist())) == [0.0, 0.25, 0.5, 0.75, 1.0]
    gen = torch.Generator().manual_seed(0)
    out = sample(
        model,
        tok,
        ["Digits:"] * 256,
        max_new_tokens=4,
        temperature=1.0,
        generator=gen,
        allowed_token_ids=space.vocab_ids,
    )
    _, rows = out.token_rows()
    index = [dist.index(r) for r in rows]  # KeyError if a response left the space
    sampled = (out.logprobs * out.completion_mask).sum(1).double()
    assert torch.allclose(sampled, dist.log_probs[index], atol=1e-5)
    # greedy stays inside too; without the option this random model leaves the space at once
    greedy = sample(model, tok, ["Digits:"], max_new_tokens=4, allowed_token_ids=space.vocab_ids)
    assert dist.index(greedy.token_rows()[1][0]) >= 0
    free = sample(model, tok, ["Digits:"] * 16, max_new_tokens=4, temperature=1.0, generator=gen)
    # without the option rows leave the space: only those whose first draw is EOS (about 1 in
    # the vocabulary's 99 on this random model) stay in it
    inside = set(dist.sequences)
    assert sum(tuple(r) in inside for r in free.token_rows()[1]) <= 2
    with pytest.raises(ValueError, match="allowed_token_ids"):
        sample(model, tok, ["a"], max_new_tokens=1, allowed_token_ids=[10_000])


# ---------------------------------------------------------------- gradients against enumeration

BETA = 0.25


def _stage(init, *overrides):
    """A DPG stage whose policy is another random model than the reference (π ≠ π_ref)."""
    recipe = _recipe(init, f"dpg.beta={BETA}", "dpg.log_z=exact", *overrides)
    _, tok = load_model_and_tokenizer(str(init))
    torch.manual_seed(1)
    policy = build_model(tok, "llama", 1, 2, 32, 64).train()
    return DPGStage(recipe, tok, policy, torch.device("cpu")), policy


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def kl_regularized_objective(pi, ref, reward, beta):
    """J(π) = E_π[r] − β·KL(π‖π_ref) (docs/methods.md §2)."""
    return expectation(pi, reward) - beta * kl(pi, ref)


def _exact_gradient(stage, policy, divergence):
    """∇ of the exact divergence between π (enumerated, with grad) and p*."""
    params = [p for p in policy.parameters() if p.requires_grad]
    pi = stage.space.distribution(policy, requires_grad=True)
    log_p = stage.target.log_target
    if divergence == "forward_kl":
        value = kl(log_p, pi)
    elif divergence == "reverse_kl":  # = −(1/β)·J(π): KL-RL's objective (checked below)
        value = -kl_regularized_objective(pi, stage.target.log_ref, stage.space.reward, BETA) / BETA
    elif divergence == "js":
        value = jensen_shannon(pi, log_p)
    else:
        value = total_variation(pi, log_p)
    return _flat_grad(value, params)


@pytest.mark.parametrize(
    "divergence,overrides",
    [
        ("forward_kl", []),  # DPG with the GDC++ baseline, on-policy
        ("forward_kl", ["dpg.proposal=adaptive"]),  # off-policy: q = π_ref, fixed
        ("forward_kl", ["dpg.temperature=1.5", "dpg.baseline=false"]),  # q = π at T = 1.5
        ("js", []),
        ("tv", []),
        ("reverse_kl", []),
    ],
)
def test_stage_gradient_averages_to_the_exact_gradient(
    tiny_checkpoint, monkeypatch, divergence, overrides
):
    stage, policy = _stage(tiny_checkpoint, f"dpg.divergence={divergence}", *overrides)
    if stage.proposal is not None:
        stage.proposal.load_state_dict(stage.reference.state_dict())
        monkeypatch.setattr(stage, "_update_proposal", lambda batch: None)  # keep q fixed
    params = [p for p in policy.parameters() if p.requires_grad]
    exact = _exact_gradient(stage, policy, divergence)
    # project on the exact direction and on 4 random ones: [5, P]
    directions = torch.randn(4, exact.numel(), generator=torch.Generator().manual_seed(3))
    directions = torch.cat([exact[None] / exact.norm(), directions.double()])
    estimates = []
    for _ in range(40):  # 40 steps of 64 samples
        loss, _ = stage.loss(policy, stage.next_batch())
        estimates.append(directions @ _flat_grad(loss, params))
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean - directions @ exact).abs() <= 4 * se + 1e-6).all(), (
        mean,
        directions @ exact,
        se,
    )
    # and the estimate points where the exact gradient does
    assert float(mean[0]) > 0.5 * float(exact.norm())


def test_reverse_kl_stage_is_kl_rl_on_its_own_samples(tiny_checkpoint):
    """β·∇(stage loss) = ∇ REINFORCE-RLOO on the shaped reward r − β·log(π/π_ref), sample by
    sample; and the exact identity ∇KL(π‖p*) = −(1/β)·∇J behind the expectation test above."""
    stage, policy = _stage(tiny_checkpoint, "dpg.divergence=reverse_kl", "dpg.log_z=running")
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(3):
        batch = stage.next_batch()
        loss, _ = stage.loss(policy, batch)
        g_stage = _flat_grad(BETA * loss, params)

        logp = stage._sequence_logprobs(policy, batch.responses)
        shaped = batch.reward - BETA * (logp.detach().double() - batch.ref_logp)
        advantages = rloo_baseline(shaped, group_size=batch.group_size)
        rl_loss, _ = reinforce_loss(logp[:, None], advantages, torch.ones(len(logp), 1))
        g_rl = _flat_grad(rl_loss, params)
        assert torch.allclose(g_stage, g_rl, rtol=1e-4, atol=1e-7)

    pi = stage.space.distribution(policy, requires_grad=True)
    g_kl = _flat_grad(kl(pi, stage.target.log_target), params)
    assert torch.allclose(g_kl, _exact_gradient(stage, policy, "reverse_kl"), atol=1e-6)


def test_adaptive_proposal_is_replaced_only_by_a_closer_policy(tiny_checkpoint):
    stage, policy = _stage(tiny_checkpoint, "dpg.proposal=adaptive", "dpg.divergence=js")
    # a policy fitted to p* by 30 on-policy steps, and a flat proposal (uniform tokens)
    stage.proposal = None
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.01)
    for _ in range(30):
        stage.loss(policy, stage.next_batch())[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    fitted = {k: v.clone() for k, v in policy.state_dict().items()}
    flat = {k: v * 0 if "embed" in k or "lm_head" in k else v for k, v in fitted.items()}
    stage.proposal = copy.deepcopy(stage.reference)
    stage.proposal.load_state_dict(flat)
    kl_fitted = kl(stage.target.log_target, stage.space.distribution(policy))
    kl_flat = kl(stage.target.log_target, stage.space.distribution(stage.proposal))
    assert kl_fitted < kl_flat - 0.2, (kl_fitted, kl_flat)  # measured 0.10 vs 0.48

    assert stage.next_batch().stats["proposal_updated"] == 1.0
    assert all(torch.equal(v, fitted[k]) for k, v in stage.proposal.state_dict().items())
    # the other way round: the flat model as the policy never replaces the fitted proposal
    policy.load_state_dict(flat)
    for _ in range(3):
        assert stage.next_batch().stats["proposal_updated"] == 0.0
    assert all(torch.equal(v, fitted[k]) for k, v in stage.proposal.state_dict().items())
    assert stage.proposal_updates == 1


# ---------------------------------------------------------------- the reward section


def _completions(stage, batch):
    r = batch.responses
    ids = r.input_ids[:, r.prompt_len :]
    return [
        stage.tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(ids, r.mask, strict=True)
    ]


@pytest.mark.parametrize("kind", [[], ["reward.kind=graded"]])
def test_the_default_reward_is_the_task_graded_score_in_fp64(tiny_checkpoint, kind):
    """An unset reward.kind means DPG's own default: the task's graded score, computed in fp64
    as before the reward section reached DPG."""
    stage, _ = _stage(tiny_checkpoint, *kind)
    assert isinstance(stage.reward, GradedReward)
    batch = stage.next_batch()
    problem = stage.task.rl_problem(random.Random(0))
    expected = [stage.task.score(problem, t) for t in _completions(stage, batch)]
    assert batch.reward.dtype == torch.float64 and batch.reward.tolist() == expected
    assert torch.equal(stage.space.reward, exact_space(stage.task, stage.tokenizer).reward)


def test_an_explicit_checker_is_the_checker(tiny_checkpoint):
    """reward.kind checker set in the recipe is the ±1 checker, not the stage's default."""
    from tether.rewards.functions import CheckerReward

    stage, _ = _stage(tiny_checkpoint, "reward.kind=checker")
    assert isinstance(stage.reward, CheckerReward)
    assert set(stage.next_batch().reward.tolist()) <= {1.0, -1.0}


def test_a_python_reward_is_the_target_reward(tiny_checkpoint, tmp_path):
    """P = π_ref·exp(r/β) with r the recipe's Python reward, in the sampled batches and in the
    enumerated target of the exact figures."""
    (tmp_path / "ones.py").write_text(
        "def reward(prompt, completion):\n    return completion.count('1') / 2\n"
    )
    stage, _ = _stage(
        tiny_checkpoint, "reward.kind=python", f"reward.function={tmp_path / 'ones.py'}:reward"
    )
    batch = stage.next_batch()
    texts = _completions(stage, batch)
    expected = torch.tensor([t.count("1") / 2 for t in texts], dtype=torch.float64)
    assert torch.equal(batch.reward, expected) and expected.max() > 0
    assert torch.allclose(batch.log_P, batch.ref_logp + expected / BETA)
    space_r = torch.tensor([t.count("1") / 2 for t in stage.space.texts], dtype=torch.float64)
    assert torch.equal(stage.space.reward, space_r)
    log_z = torch.logsumexp(stage.target.log_ref + space_r / BETA, 0)
    assert stage.target.log_z == pytest.approx(float(log_z), rel=1e-12)


def test_a_broken_python_reward_is_one_line(tiny_checkpoint):
    """The reward section reaches DPG: a function it cannot load is its one-line error."""
    with pytest.raises(RewardError, match="^reward.function 'no_such_file.py:f'") as err:
        _stage(tiny_checkpoint, "reward.kind=python", "reward.function=no_such_file.py:f")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- training in the loop


def test_dpg_training_lowers_the_exact_forward_kl(tiny_checkpoint, tmp_path):
    """Measured (1 thread, 1.0 s): at β = 0.1, 60 steps of 64 samples take KL(p*‖π) from 2.416
    to 0.449 and KL(π‖p*) from 2.815 to 0.346; E_π[r] 0.373 → 0.847 (the target's is 0.896),
    π(r = 1) 0.021 → 0.609 (p*: 0.659), entropy 4.67 → 3.39 nats (p*: 3.62)."""
    recipe = _recipe(
        tiny_checkpoint,
        "dpg.beta=0.1",
        "train.steps=60",
        "train.eval_every=60",
        "train.log_every=10",
        "optim.lr=0.01",
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    start = next(r for r in metrics(tmp_path / "run") if r["step"] == 0)
    # π = π_ref at step 0: the same weights in two copies, whose fp32 passes may round apart
    # (GEMM kernels can split sums by the operands' memory alignment): 1.5e-8 on an AMD EPYC,
    # against 2.32 after the run
    assert start["exact/kl_policy_ref"] == pytest.approx(0.0, abs=1e-6)
    assert summary["exact/kl_target_policy"] < 0.35 * start["exact/kl_target_policy"], summary
    assert summary["exact/reward"] > start["exact/reward"] + 0.3
    assert summary["exact/log_z"] == start["exact/log_z"]
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert all("kl_target_policy" in r and "ess_fraction" in r for r in rows)
    assert "eval/acc_rl" not in summary  # exact figures replace the sampled evaluation
    meta = json.loads((tmp_path / "run" / "model" / "tether.json").read_text())
    assert meta["init"] == str(tiny_checkpoint) and meta["dpg"]["beta"] == 0.1


def test_hard_constraint_target_trains(tiny_checkpoint, tmp_path):
    recipe = _recipe(
        tiny_checkpoint,
        "dpg.target=constraint",
        "dpg.divergence=js",
        "train.steps=3",
        "train.eval_every=3",
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    # p* is π_ref given r = 1: log Z = log π_ref(r = 1); KL(π‖p*) is infinite, so not logged
    assert summary["exact/log_z"] < 0 and "exact/kl_policy_target" not in summary
    assert "exact/kl_target_policy" in summary and "exact/objective" not in summary


def test_a_task_without_a_space_samples_unrestricted(tiny_checkpoint, tmp_path):
    """first-digit: several prompts a step, generation-based evaluation, no exact figures."""
    recipe = _recipe(
        tiny_checkpoint,
        "task.name=first-digit",
        "dpg.prompts_per_step=2",
        "dpg.samples_per_step=8",
        "train.steps=2",
        "train.eval_every=2",
        "eval.n=4",
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    assert "eval/acc_rl" in summary and not any(k.startswith("exact/") for k in summary)
    assert all("kl_policy_ref" in r for r in metrics(tmp_path / "run") if "loss" in r)


def test_resume_is_exact(tiny_checkpoint, tmp_path, monkeypatch):
    """The proposal's weights, the running log Z and the prompt/sample streams all resume."""
    overrides = [
        "dpg.proposal=adaptive",
        "dpg.log_z=running",
        "dpg.prompts_per_step=2",
        "dpg.samples_per_step=32",
        "optim.lr=0.01",
        "train.steps=6",
        "train.eval_every=2",
        "train.checkpoint_every=100",
    ]
    recipe = _recipe(tiny_checkpoint, *overrides)
    _, whole = assert_resume_is_exact(recipe, DPGStage, tmp_path, monkeypatch)
    assert any(r.get("proposal_updated") == 1.0 for r in metrics(whole))  # the proposal moved


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.init=null"], "model.init is required when train.stage is dpg"),
        (["dpg.divergence=hellinger"], "dpg.divergence: Input should be"),
        (["dpg.target=constraint", "dpg.divergence=reverse_kl"], "reverse_kl is infinite"),
        (["dpg.samples_per_step=10", "dpg.prompts_per_step=3"], "must be a multiple"),
        (["dpg.samples_per_step=3", "dpg.prompts_per_step=3"], "at least 2 samples"),
        (["dpg.beta=0"], "dpg.beta: Input should be greater than 0"),
        (["task.name=addition", "dpg.log_z=exact"], "dpg.log_z exact needs task.name enumerable"),
        (["task.max_digits=9"], "task.max_digits 9: the enumerable space holds"),
        (["task.name=multistep-prefs"], "holds preference pairs"),
    ],
)
def test_recipe_errors_are_one_line(tiny_checkpoint, overrides, message):
    with pytest.raises(RecipeError, match=message) as err:
        _recipe(tiny_checkpoint, *overrides)
    assert "\n" not in str(err.value)


def test_packaged_recipes_load():
    reference = load_recipe("enumerable-reference")
    dpg = load_recipe("dpg-enumerable")
    assert reference.task.name == dpg.task.name == "enumerable"
    assert dpg.train.stage == "dpg" and dpg.model.init == "runs/enumerable-reference/model"


# ---------------------------------------------------------------- the CLI


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_tether_train_and_eval_exact(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    sets = [
        "task.name=enumerable",
        f"model.init={tiny_checkpoint}",
        "train.stage=dpg",
        "dpg.beta=0.1",
        "train.steps=20",
        "train.eval_every=20",
        "optim.warmup_steps=0",
        "optim.lr=0.01",
    ]
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("{}\n")
    code, output = _cli(
        "train", recipe, "--out", out, "--quiet", *(a for kv in sets for a in ("--set", kv))
    )
    assert code == 0, output

    result = CliRunner().invoke(app, ["eval", str(out), "--exact", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (
        doc["responses"] == 341 and doc["beta"] == 0.1 and doc["reference"] == str(tiny_checkpoint)
    )
    policy, reference, target = (doc["figures"][k] for k in ("policy", "reference", "target"))
    assert policy["kl_target_policy"] < 0.6 * reference["kl_target_policy"]
    assert target["kl_target_policy"] == pytest.approx(0.0, abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())  # the same figures as training's
    assert policy["kl_target_policy"] == pytest.approx(summary["exact/kl_target_policy"], 1e-6)
    assert len(doc["top_responses"]) == 5

    code, output = _cli("eval", out, "--exact", "--beta", "1.0")
    assert code == 0 and "KL(p*‖π)" in output and "β = 1" in output, output


def test_eval_exact_errors_are_one_line(tiny_checkpoint):
    cases = [
        ([], "--exact lists every response, which only the enumerable task allows"),
        (["--task", "enumerable"], "records no reference"),
        (["--task", "enumerable", "--reference", tiny_checkpoint], "give --beta B"),
        (["--task", "enumerable", "--reference", "/nonexistent", "--beta", "1"], "reference"),
        (["--task", "enumerable", "--reference", tiny_checkpoint, "--beta", "0"], "must be > 0"),
    ]
    for extra, message in cases:
        code, output = _cli("eval", tiny_checkpoint, "--exact", *extra)
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
        assert message in lines[0], output
    code, output = _cli("eval", tiny_checkpoint, "--beta", "1")
    assert code == 2 and "go with --exact" in output
    # the reference against itself: the policy column is the reference column
    code, output = _cli(
        "eval", tiny_checkpoint, "--exact", "--task", "enumerable", "--reference",
        tiny_checkpoint, "--beta", "0.5", "--json",
    )  # fmt: skip
    doc = json.loads(output)
    assert doc["figures"]["policy"] == doc["figures"]["reference"]
