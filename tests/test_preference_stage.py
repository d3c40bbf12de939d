"""Offline preference training in the one loop, on tiny models: DPO starts at log 2 and learns
the preferred side, IPO runs, resume is exact, a reward model finds a planted preference,
preference files fail in one line and skip bad rows, and `tether train` runs both stages."""

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from test_reliability import assert_resume_is_exact
from tether.batches import OfflinePairBatch
from tether.cli import app
from tether.config import RecipeError, load_recipe
from tether.engine.loop import train
from tether.engine.setup import build_policy
from tether.rewards.reward_model import REWARD_HEAD_FILE, load_reward_model
from tether.stages.preference import DPOStage, RewardModelStage
from tether.tasks import task_from_config
from tether.tasks.jsonl import DatasetError
from tether.tasks.preferences import (
    MultistepPrefsTask,
    PreferenceTask,
    load_preference_dataset,
    slipped_solution,
)

TIMING = {"tokens_per_s", "elapsed_s", "peak_rss_mb"}  # not the same from run to run


pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_positions=64",
    "train.batch_size=8",
    "train.log_every=1",
    "optim.warmup_steps=0",
    "eval.n=4",
]


def _dpo(tiny_checkpoint, *overrides):
    return load_recipe(
        None,
        [
            *TINY,
            "task.name=multistep-prefs",
            "task.max_digits=1",
            f"model.init={tiny_checkpoint}",
            "train.stage=dpo",
            *overrides,
        ],
    )


def _stage(recipe):
    model, tokenizer = build_policy(recipe)
    from tether.stages.base import make_stage

    return make_stage(recipe, tokenizer, model, torch.device("cpu")), model


# ---------------------------------------------------------------- tasks and config


def test_generated_pairs_are_an_expert_chain_and_the_same_chain_with_one_slip():
    task = MultistepPrefsTask(max_digits=2)
    rng = random.Random(0)
    for _ in range(50):
        pair = task.pretrain_problem(rng)
        assert task.is_correct(pair, pair.chosen) and task.score(pair, pair.chosen) == 1.0
        assert not task.is_correct(pair, pair.rejected) and task.score(pair, pair.rejected) < 1
        assert pair.target == pair.chosen and pair.chosen != pair.rejected
        assert len(pair.rejected) <= task.max_new_tokens()
    assert slipped_solution((12, 30, 5), 0, 1) == "12+30=43,43+5=48;48"


def test_recipes_check_the_preference_keys(tiny_checkpoint):
    with pytest.raises(RecipeError, match="model.init is required when train.stage is dpo"):
        load_recipe(None, ["task.name=multistep-prefs", "train.stage=dpo"])
    with pytest.raises(RecipeError, match="needs preference pairs"):
        load_recipe(None, [f"model.init={tiny_checkpoint}", "train.stage=dpo"])
    with pytest.raises(RecipeError, match="task.path is required"):
        load_recipe(None, ["task.name=prefs-jsonl"])
    with pytest.raises(RecipeError, match="label_smoothing applies to loss sigmoid"):
        load_recipe(None, ["preference.loss=ipo", "preference.label_smoothing=0.1"])
    with pytest.raises(RecipeError, match="preference.beta"):
        load_recipe(None, ["preference.beta=0"])
    recipe = load_recipe(None, ["task.name=multistep-prefs", "train.stage=reward-model"])
    assert recipe.preference.loss == "sigmoid" and recipe.preference.beta == 0.1


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_preference_file_counts_its_skips(tmp_path):
    good = [{"q": f"P{i}", "good": "yes", "bad": "no"} for i in range(3)]
    path = _write(
        tmp_path / "p.jsonl",
        [
            *good,
            {"q": "P", "good": "same", "bad": "same"},
            {"q": "P", "good": " ", "bad": "no"},
            "{not json",
            {"q": "P", "good": "yes"},
        ],
    )
    ds, report = load_preference_dataset(
        path, prompt_field="q", chosen_field="good", rejected_field="bad"
    )
    assert ds.column_names == ["prompt", "chosen", "rejected", "line"] and len(ds) == 3
    assert report.summary() == (
        f"kept 3 of 7 rows of {path}; skipped 4: 1 not_json (line 6), 1 missing_field "
        "(line 7), 1 empty_completion (line 5), 1 same_response (line 4)"
    )
    task = PreferenceTask(ds, report)
    pair = task.pretrain_problem(random.Random(0))
    assert task.score(pair, "yes") == 1.0 and task.score(pair, "no") == 0.0
    assert task.score(pair, "") == 0.5 and task.is_correct(pair, " yes ")
    with pytest.raises(DatasetError, match="line 4: fields 'good' and 'bad' are the same"):
        load_preference_dataset(
            path, prompt_field="q", chosen_field="good", rejected_field="bad", strict=True
        )


# ---------------------------------------------------------------- DPO and IPO


def test_dpo_starts_at_log_2_exactly(tiny_checkpoint):
    stage, model = _stage(_dpo(tiny_checkpoint))
    assert isinstance(stage, DPOStage)
    batch = stage.next_batch()
    assert isinstance(batch, OfflinePairBatch) and batch.pairs == 8
    ids = batch.tokens.input_ids
    assert torch.equal(ids[:8, :5], ids[8:, :5])  # chosen and rejected rows share prompts
    loss, stats = stage.loss(model, batch)
    assert loss.item() == torch.tensor(math.log(2)).item()  # policy == reference: h = 0
    assert stats["reward_margin"] == 0.0 and stats["reward_accuracy"] == 0.0


def _steps(stage, model, n, lr):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    seen = []
    for _ in range(n):
        loss, stats = stage.loss(model, stage.next_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(stats)
    return seen


def test_a_few_dpo_steps_prefer_the_chosen_side(tiny_checkpoint):
    # a fixed pool of 8 pairs (task.train_size): a random 1-layer model cannot learn
    # arithmetic in a few steps, but it can learn which of these responses is preferred
    stage, model = _stage(_dpo(tiny_checkpoint, "task.train_size=8", "train.batch_size=16"))
    seen = _steps(stage, model, 10, lr=1e-2)
    assert seen[0]["reward_margin"] == 0.0
    margins = [s["reward_margin"] for s in seen]
    assert margins == sorted(margins[:8]) + margins[8:] and margins[-1] > 1.0
    assert all(s["reward_accuracy"] == 1.0 for s in seen[2:])
    assert seen[-1]["loss"] < 0.3
    # the log-ratios move both ways: the rejected response becomes less likely
    assert seen[-1]["rejected_reward"] < 0 < seen[-1]["reward_margin"]


def test_ipo_starts_at_its_target_and_moves_toward_it(tiny_checkpoint):
    overrides = ["task.train_size=8", "preference.loss=ipo", "preference.beta=0.1"]
    stage, model = _stage(_dpo(tiny_checkpoint, *overrides))
    losses = [s["loss"] for s in _steps(stage, model, 6, lr=3e-3)]
    assert losses[0] == pytest.approx(25.0)  # (0 − 1/(2β))² with β = 0.1
    assert losses == sorted(losses, reverse=True) and losses[-1] < 10


def test_length_normalised_log_ratios_run(tiny_checkpoint):
    stage, model = _stage(_dpo(tiny_checkpoint, "preference.length_normalize=true"))
    loss, _ = stage.loss(model, stage.next_batch())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.dim() == 2)


def test_dpo_resume_is_exact(tiny_checkpoint, tmp_path, monkeypatch):
    overrides = ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=2"]
    recipe = _dpo(tiny_checkpoint, *overrides)
    _, whole = assert_resume_is_exact(recipe, DPOStage, tmp_path, monkeypatch)
    rows = [r for r in metrics(whole) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2)) and "reward_accuracy" in rows[0]


# ---------------------------------------------------------------- reward model


def _planted(rng, n):
    """Chosen responses end in '!', rejected ones in another character; otherwise alike."""
    letters = "abcdefghij"
    rows = []
    for _ in range(n):
        body = "".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
        prompt = "Say " + "".join(rng.choice(letters) for _ in range(3)) + ":"
        rows.append({"prompt": prompt, "chosen": body + "!", "rejected": body + rng.choice("?.")})
    return rows


def test_reward_model_learns_a_planted_preference(tmp_path):
    rng = random.Random(0)
    data = _write(tmp_path / "train.jsonl", _planted(rng, 200))
    held_out = _planted(rng, 100)
    recipe = load_recipe(
        None,
        [
            *TINY,
            "task.name=prefs-jsonl",
            f"task.path={data}",
            "train.stage=reward-model",
            "train.steps=30",
            "train.batch_size=16",
            "train.eval_every=1000",
            "train.checkpoint_every=1000",
            "optim.lr=0.01",
        ],
    )
    train(recipe, tmp_path / "run", progress=False)
    first = [r for r in metrics(tmp_path / "run") if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2))  # the head starts at zero
    assert (tmp_path / "run" / "model" / REWARD_HEAD_FILE).is_file()
    reward = load_reward_model(tmp_path / "run")
    prompts = [r["prompt"] for r in held_out]
    chosen = reward.score(prompts, [r["chosen"] for r in held_out])
    rejected = reward.score(prompts, [r["rejected"] for r in held_out])
    accuracy = (chosen > rejected).float().mean().item()
    assert accuracy > 0.9
    # the loop's own evaluation judges the reward model by its scores, not by generation
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval/pair_accuracy"] > 0.9 and "eval/acc_rl" not in summary


def test_dpo_evaluation_reports_pairwise_accuracy(tiny_checkpoint, tmp_path):
    recipe = _dpo(tiny_checkpoint, "train.steps=2", "train.eval_every=1", "eval.n=6")
    train(recipe, tmp_path / "run", progress=False)
    evals = [r for r in metrics(tmp_path / "run") if "eval/pair_accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all("eval/acc_rl" in r for r in evals)  # the policy still generates
    assert all(0.0 <= r["eval/pair_accuracy"] <= 1.0 for r in evals)


def test_reward_model_resume_restores_the_head(tmp_path, monkeypatch):
    overrides = [
        *TINY,
        "task.name=multistep-prefs",
        "task.max_digits=1",
        "train.stage=reward-model",
        "train.steps=4",
        "train.eval_every=1000",
        "train.checkpoint_every=2",
    ]
    recipe = load_recipe(None, overrides)
    cut, whole = assert_resume_is_exact(recipe, RewardModelStage, tmp_path, monkeypatch)
    assert (cut / "checkpoints" / "step-000003" / REWARD_HEAD_FILE).is_file()
    a, b = load_reward_model(cut).head, load_reward_model(whole).head
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_a_checkpoint_without_a_head_is_not_a_reward_model(tiny_checkpoint):
    from tether.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a reward-model checkpoint"):
        load_reward_model(tiny_checkpoint)


# ---------------------------------------------------------------- the CLI


def _cli_train(tmp_path, out, sets):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("{}\n")
    args = ["train", str(recipe), "--out", str(out), "--quiet"]
    return CliRunner().invoke(app, [*args, *(a for kv in sets for a in ("--set", kv))])


def test_malformed_preference_file_is_one_line_and_leaves_nothing(tmp_path, tiny_checkpoint):
    data = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}])
    out = tmp_path / "run"
    sets = [
        "task.name=prefs-jsonl",
        f"task.path={data}",
        f"model.init={tiny_checkpoint}",
        "train.stage=dpo",
    ]
    result = _cli_train(tmp_path, out, sets)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no usable rows" in lines[0]
    assert "1 same_response (line 1)" in lines[0] and not out.exists()


@pytest.mark.parametrize("stage", ["dpo", "reward-model"])
def test_tether_train_runs_each_preference_stage(tmp_path, tiny_checkpoint, stage):
    rows = [
        {"prompt": f"Q{i}:", "chosen": f" {i % 7}", "rejected": f" {i % 5 + 1}x"} for i in range(12)
    ]
    data = _write(
        tmp_path / "prefs.jsonl", [*rows, {"prompt": "Q:", "chosen": "a", "rejected": "a"}]
    )
    out = tmp_path / "run"
    sets = [
        *TINY,
        "task.name=prefs-jsonl",
        f"task.path={data}",
        f"model.init={tiny_checkpoint}",
        f"train.stage={stage}",
        "train.steps=3",
        "train.eval_every=3",
    ]
    result = _cli_train(tmp_path, out, sets)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"].startswith("kept 12 of 13 rows")
    assert "same_response (line 13)" in summary["data"]
    assert 0.0 <= summary["eval/pair_accuracy"] <= 1.0
    assert ("eval/score" in summary) == (stage == "dpo")  # a reward model does not generate
    logged = [r for r in metrics(out) if "loss" in r]
    assert len(logged) == 3
    key = "reward_accuracy" if stage == "dpo" else "accuracy"
    assert all(key in r for r in logged)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    assert (out / "model" / REWARD_HEAD_FILE).is_file() == (stage == "reward-model")
    assert task_from_config(load_recipe(out / "config.yaml").task).report.kept == 12
