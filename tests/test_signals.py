"""Signals of a broken set-up: each warning is given once, after its condition held for K steps
in a row, in one line on stderr and in summary.json; a healthy run gives none; the sampling
stages log the figures the warnings read, computed as by hand."""

import pytest
import torch

from test_micro_batches import CASES, _recipe, _stage
from tether.config import load_recipe
from tether.engine.loop import train
from tether.engine.signals import REWARD_STEPS, STEPS, SetupMonitor
from tether.stages.base import sample_health
from tether.stages.imitation import ImitationStage

pytestmark = pytest.mark.usefixtures("one_thread")

HEALTHY = {
    "frac_constant_groups": 0.5,
    "frac_truncated": 0.2,
    "frac_empty": 0.0,
    "kl_weight_low": 0.3,
    "kl_weight_high": 0.2,
    "loss": 1.0,
}

# each signal: the bad value, the steps it needs, words its line must hold
BROKEN = {
    "frac_constant_groups": (1.0, REWARD_STEPS, "same reward"),
    "frac_truncated": (1.0, STEPS, "raise max_new_tokens"),
    "frac_empty": (0.75, STEPS, "completions were empty"),
    "kl_weight_low": (0.97, STEPS, "lower rl.certainty_exponent"),
    "kl_weight_high": (0.995, STEPS, "nothing is prioritised"),
}


@pytest.mark.parametrize("key", list(BROKEN))
def test_each_signal_warns_once_after_its_steps(key):
    bad, steps, words = BROKEN[key]
    monitor = SetupMonitor()
    lines = []
    for step in range(1, steps):  # one step short: nothing yet
        lines += monitor.observe(step, {**HEALTHY, key: bad})
    assert lines == []
    # a healthy step breaks the streak: the count starts again
    assert monitor.observe(steps, HEALTHY) == []
    for step in range(steps + 1, 2 * steps):
        assert monitor.observe(step, {**HEALTHY, key: bad}) == []
    (line,) = monitor.observe(2 * steps, {**HEALTHY, key: bad})
    assert line.startswith(f"warning: step {2 * steps}: ") and words in line and key in line
    assert "\n" not in line
    for step in range(2 * steps + 1, 4 * steps):  # once per run
        assert monitor.observe(step, {**HEALTHY, key: bad}) == []
    assert monitor.warnings == [line]


def test_values_short_of_the_thresholds_and_missing_figures_say_nothing():
    monitor = SetupMonitor()
    near = {
        "frac_constant_groups": 0.99,
        "frac_truncated": 0.99,
        "frac_empty": 0.5,
        "kl_weight_low": 0.95,
        "kl_weight_high": 0.99,
    }
    for step in range(1, 3 * REWARD_STEPS):
        assert monitor.observe(step, near) == []
        assert monitor.observe(step, {"loss": 1.0}) == []  # a stage that does not sample
    assert monitor.warnings == []


def test_sample_health_by_hand():
    figures = sample_health(
        ["", " \n", "12", "7"],
        [True, False, True, False],
        torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
    )
    assert figures == {"frac_constant_groups": 0.5, "frac_truncated": 0.5, "frac_empty": 0.5}


@pytest.mark.parametrize("case", ["rl-rloo", "online-dpo", "xpo", "dpg"])
def test_the_sampling_stages_log_the_figures(case, tiny_checkpoint):
    assert case in CASES
    stage, model = _stage(_recipe(case, tiny_checkpoint))
    _, stats = stage.loss(model, stage.next_batch())
    for key in ("frac_constant_groups", "frac_truncated", "frac_empty"):
        assert 0.0 <= stats[key] <= 1.0, key


MLE = [
    "task.max_digits=1",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_positions=64",
    "train.batch_size=2",
    "train.log_every=1",
    "train.eval_every=1000",
    "eval.n=2",
    f"train.steps={STEPS + 2}",
]


def _stand_in(monkeypatch, figures):
    """The MLE stage, its loss's figures joined by ``figures`` (a stage that samples)."""
    loss = ImitationStage.loss

    def with_figures(self, model, batch):
        value, stats = loss(self, model, batch)
        return value, {**stats, **figures}

    monkeypatch.setattr(ImitationStage, "loss", with_figures)


def test_the_loop_prints_a_warning_once_and_keeps_it_in_the_summary(tmp_path, monkeypatch, capsys):
    _stand_in(monkeypatch, {**HEALTHY, "frac_truncated": 1.0})
    summary = train(load_recipe(None, MLE), tmp_path / "run", progress=False)
    said = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(said) == 1 and said[0].startswith(f"warning: step {STEPS}: every completion")
    assert summary["warnings"] == said


def test_a_healthy_run_prints_no_warning(tmp_path, monkeypatch, capsys):
    _stand_in(monkeypatch, HEALTHY)
    summary = train(load_recipe(None, MLE), tmp_path / "run", progress=False)
    assert "warning" not in capsys.readouterr().err
    assert summary["warnings"] == []
