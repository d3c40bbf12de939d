"""Rewards of sampled completions: the graded addition score by hand, user functions and their
errors, a learned reward model, and CTRL's calibrated reward (cache, mid-ranks, invariance to a
monotone change of the reward, uniform under the reference), alone and inside the RL stage."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from tether.config import RecipeError, load_recipe
from tether.distributions.infalign import default_t
from tether.engine.loop import train
from tether.rewards.functions import (
    CalibratedReward,
    CheckerReward,
    GradedReward,
    ModelReward,
    PythonReward,
    RewardError,
    build_reward,
)
from tether.tasks import AdditionTask
from tether.tasks.addition import Problem, digit_score

pytestmark = pytest.mark.usefixtures("one_thread")


def _answer(digits: str) -> str:
    return "\n<scratch>\n...\n</scratch>\n" + " ".join(digits)


def test_digit_score_by_hand():
    p = Problem(1234, 4321)  # 5555
    assert digit_score(p, _answer("5555")) == 1.0
    assert digit_score(p, _answer("5545")) == 0.75
    assert digit_score(p, _answer("555")) == 0.75  # three of four places
    assert digit_score(p, _answer("15555")) == 0.8  # an extra digit is a wrong place
    assert digit_score(p, _answer("0000")) == 0.0
    assert digit_score(p, "no answer line") == 0.0 and digit_score(p, None) == 0.0
    task = AdditionTask(3)
    assert task.score(p, _answer("5555")) == 1.0 and task.is_correct(p, _answer("5555"))
    assert not task.is_correct(p, _answer("5545"))


def test_checker_and_graded_rewards():
    task = AdditionTask(3)
    problems = [Problem(1, 2), Problem(10, 20)]
    texts = [_answer("3"), _answer("31")]
    assert CheckerReward(task, 2.0, -0.5)(problems, texts).tolist() == [2.0, -0.5]
    assert GradedReward(task)(problems, texts).tolist() == [1.0, 0.5]


def _write(tmp_path, body):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return path


def test_a_python_reward_from_a_file(tmp_path):
    path = _write(tmp_path, "def reward(prompt, completion):\n    return len(completion) - 0.5\n")
    fn = PythonReward(f"{path}:reward")
    out = fn([SimpleNamespace(prompt="p")] * 2, ["ab", ""])
    assert out.dtype == torch.float32 and out.tolist() == [1.5, -0.5]


def test_a_python_reward_from_a_module():
    fn = PythonReward("operator:contains")  # any importable callable: completion in prompt
    assert fn([SimpleNamespace(prompt="abc")] * 2, ["b", "x"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected 'package.module:name'"),
        ("missing.py:reward", "no such file"),
        ("tether.no_such_module:f", "cannot import"),
        ("tether.tasks.addition:nope", "has no function 'nope'"),
    ],
)
def test_python_reward_spec_errors_name_the_problem(spec, message):
    with pytest.raises(RewardError, match=message):
        PythonReward(spec)


@pytest.mark.parametrize("value", ["'high'", "float('nan')", "None"])
def test_a_python_reward_must_return_a_finite_number(tmp_path, value):
    path = _write(tmp_path, f"def reward(prompt, completion):\n    return {value}\n")
    with pytest.raises(RewardError, match="must return a finite number"):
        PythonReward(f"{path}:reward")([SimpleNamespace(prompt="p")], ["x"])


def test_a_python_reward_that_raises_names_the_function_the_error_and_the_completion(tmp_path):
    path = _write(tmp_path, "def reward(prompt, completion):\n    raise KeyError('oops')\n")
    with pytest.raises(RewardError) as err:
        PythonReward(f"{path}:reward")([SimpleNamespace(prompt="p")], ["12"])
    assert (
        str(err.value)
        == f"reward.function '{path}:reward' raised KeyError('oops') on completion '12'"
    )


@pytest.mark.parametrize("spec", ["os:getcwd", "operator:not_"])
def test_a_python_reward_of_the_wrong_signature_is_refused_when_built(spec):
    with pytest.raises(RewardError, match=r"must take two arguments \(prompt, completion\)"):
        PythonReward(spec)


# ---------------------------------------------------------------- a Python reward reads the row


def _prompt_only(tmp_path, rows):
    from tether.tasks.jsonl import JsonlTask

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JsonlTask.from_file(path, completion_field=None), path


def test_a_python_reward_receives_the_columns_its_parameters_name(tmp_path):
    task, _ = _prompt_only(
        tmp_path,
        [
            {"prompt": "2+2?", "answer": "4", "weight": 2.0, "id": "a"},
            {"prompt": "3+3?", "answer": "6", "weight": 0.5, "id": "b"},
        ],
    )
    body = (
        "def reward(prompt, completion, answer, weight, scale=10.0):\n"
        "    return weight * scale * (completion.strip() == answer)\n"
        "def every(question, completion, **fields):\n"
        "    return float(sorted(fields) == ['answer', 'id', 'prompt', 'weight'])\n"
        "def plain(prompt, completion):\n"
        "    return len(prompt) + len(completion)\n"
    )
    path = _write(tmp_path, body)
    problems = [task.pair(0), task.pair(1), task.pair(1)]
    completions = ["4", " 6 ", "7"]
    # by hand: 2.0·10·1, 0.5·10·1, 0.5·10·0
    assert PythonReward(f"{path}:reward", task)(problems, completions).tolist() == [20.0, 5.0, 0.0]
    # **fields: every column but those bound by position (here none is called 'question')
    assert PythonReward(f"{path}:every", task)(problems, completions).tolist() == [1.0] * 3
    assert PythonReward(f"{path}:plain", task)(problems, completions).tolist() == [5.0, 7.0, 5.0]


def test_a_dataclass_problem_offers_its_fields():
    task = AdditionTask(3)
    reward = PythonReward("tether.tasks.addition:make_prompt", task)  # (a, b): by position
    assert reward.signature.columns == ()

    def by_field(prompt, completion, a, b):
        return a + b

    import sys

    module = SimpleNamespace(by_field=by_field)
    sys.modules["tether_test_fields"] = module  # type: ignore[assignment]
    try:
        r = PythonReward("tether_test_fields:by_field", task)
        assert r([Problem(12, 30)], ["x"]).tolist() == [42.0]
    finally:
        del sys.modules["tether_test_fields"]


def test_a_parameter_without_a_column_is_one_line_naming_the_column_and_the_file(tmp_path):
    task, data = _prompt_only(
        tmp_path, [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, {"prompt": "c", "answer": "3"}]
    )
    path = _write(
        tmp_path,
        "def nope(prompt, completion, solution):\n    return 0.0\n"
        "def some(prompt, completion, answer):\n    return 0.0\n"
        "def optional(prompt, completion, answer=''):\n    return float(answer == '1')\n",
    )
    with pytest.raises(RewardError) as info:
        PythonReward(f"{path}:nope", task)
    assert str(info.value) == (
        f"reward.function '{path}:nope': parameter 'solution' has no column in {data} "
        "(its columns: prompt, answer)"
    )
    with pytest.raises(RewardError) as info:
        PythonReward(f"{path}:some", task)
    assert str(info.value) == (
        f"reward.function '{path}:some': parameter 'answer': column 'answer' is missing from "
        f"1 rows of {data} (first: line 2)"
    )
    # built without the task, a row without the column is refused when scored, by its line
    with pytest.raises(RewardError, match="parameter 'answer' has no column in line 2$"):
        PythonReward(f"{path}:some")([task.pair(1)], ["x"])
    built = PythonReward(f"{path}:optional", task)
    built.signature = PythonReward(f"{path}:some").signature  # as if the file changed since
    with pytest.raises(RewardError, match=f"parameter 'answer' has no column in line 2 of {data}"):
        built([task.pair(1)], ["x"])
    # a parameter with a default takes it where the row has no such column
    optional = PythonReward(f"{path}:optional", task)
    assert optional([task.pair(0), task.pair(1)], ["x", "y"]).tolist() == [1.0, 0.0]


def test_a_prompt_only_task_needs_a_reward_that_does_not_need_a_reference(tmp_path):
    task, _ = _prompt_only(tmp_path, [{"prompt": "a"}])
    for kind in ("checker", "graded"):
        recipe = SimpleNamespace(reward=SimpleNamespace(kind=kind), rl=None)
        with pytest.raises(RewardError, match=f"reward.kind {kind}: task.completion_field is null"):
            build_reward(recipe, task)


def test_a_reward_model_checkpoint_scores_as_its_head_says(tiny_checkpoint, tmp_path):
    from tether.models.loading import load_model_and_tokenizer
    from tether.rewards.reward_model import REWARD_HEAD_FILE, last_token_scores, save_reward_head

    lm, tok = load_model_and_tokenizer(str(tiny_checkpoint))
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.weight)
    ckpt = tmp_path / "rm"
    lm.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    save_reward_head(head, ckpt)
    assert (ckpt / REWARD_HEAD_FILE).is_file()

    problems = [SimpleNamespace(prompt="a:"), SimpleNamespace(prompt="bb:")]
    texts = ["xy", "z"]
    scores = ModelReward(str(ckpt), batch_size=1)(problems, texts)
    ids = [tok("a:xy")["input_ids"] + [tok.eos_token_id], tok("bb:z")["input_ids"]]
    ids[1] += [tok.eos_token_id]
    with torch.no_grad():
        expected = [
            float(last_token_scores(lm, head, torch.tensor([r]), torch.ones(1, len(r), dtype=int)))
            for r in ids
        ]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- CTRL


class FakeReference:
    """A reference 'model' whose completions are reward values: prompt-specific i.i.d. draws."""

    def __init__(self, seed=0):
        self.rng = random.Random(seed)
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, prompts, k):
        self.calls.append((list(prompts), k))
        return [str(self.draw(p)) for p in prompts for _ in range(k)]

    def draw(self, prompt):
        return self.rng.randint(0, 9) + (10 if prompt == "hard" else 0)


def value_reward(problems, completions):
    return torch.tensor([float(c) for c in completions])


def test_calibration_caches_k_reference_samples_per_prompt_and_ranks_by_hand():
    ref = FakeReference()
    ctrl = CalibratedReward(value_reward, ref, k=4)
    ctrl.cache["easy"] = torch.tensor([1.0, 3.0, 3.0, 7.0])  # as if sampled
    problems = [SimpleNamespace(prompt="easy")] * 4 + [SimpleNamespace(prompt="new")]
    out = ctrl.details(problems, ["0", "3", "5", "9", "4"])
    # mid-ranks: (#below + ½·#equal)/K
    assert out["calibrated"][:4].tolist() == [0.0, (1 + 1) / 4, 3 / 4, 1.0]
    assert ref.calls == [(["new"], 4)]  # only the unseen prompt is sampled
    ctrl.details(problems, ["0"] * 5)
    assert len(ref.calls) == 1  # and only once


def test_transforms_and_the_default_t():
    ctrl = CalibratedReward(value_reward, FakeReference(), k=4, kind="exp", n=3)
    assert ctrl.t == default_t(3) == 5.0
    ctrl.cache["x"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = [SimpleNamespace(prompt="x")] * 2
    phi = ctrl(p, ["0", "2.5"])
    # e^{t·(C − 1)}: C = 0 and C = ½ (a tie between the 2nd and 3rd references)
    assert phi.tolist() == pytest.approx([math.exp(-5.0), math.exp(5.0 * (0.5 - 1))])
    log = CalibratedReward(value_reward, FakeReference(), k=4, kind="log")
    log.cache["x"] = ctrl.cache["x"]
    # C = 0 is floored at half a rank below the lowest reference: log(1/(2K))
    assert log(p, ["0", "2.5"]).tolist() == pytest.approx(
        [float(torch.log(torch.tensor(1 / 8))), float(torch.log(torch.tensor(0.5)))]
    )


def test_t_can_be_optimised_for_n():
    from tether.distributions.infalign import optimise_t

    ctrl = CalibratedReward(value_reward, FakeReference(), k=4, kind="exp", t="optimise", n=4)
    assert ctrl.t == pytest.approx(optimise_t(4)) and 7.0 < ctrl.t < 9.0  # ≈ 2N near π_ref
    sets = ["train.stage=rl", "model.init=addition-n3", "reward.calibrate=true"]
    assert load_recipe(None, [*sets, "reward.t=optimise"]).reward.t == "optimise"
    with pytest.raises(RecipeError, match="reward.t"):
        load_recipe(None, ["reward.t=-1"])


def test_calibration_ignores_a_monotone_change_of_the_reward():
    def squashed(problems, completions):
        return torch.exp(value_reward(problems, completions) / 5) * 3 - 40  # increasing

    a = CalibratedReward(value_reward, FakeReference(seed=3), k=32)
    b = CalibratedReward(squashed, FakeReference(seed=3), k=32)
    problems = [SimpleNamespace(prompt=q) for q in ("easy", "hard", "easy")]
    texts = ["4", "13", "9"]
    assert torch.equal(
        a.details(problems, texts)["calibrated"], b.details(problems, texts)["calibrated"]
    )


def test_calibrated_reference_samples_are_uniform_on_average():
    """E[C] = ½ under π_ref for any reward distribution (ties included): fresh reference draws
    calibrated against the cache average ½ within their standard error."""
    ref = FakeReference(seed=5)
    ctrl = CalibratedReward(value_reward, ref, k=64)
    prompts = [f"p{i}" for i in range(200)]
    problems = [SimpleNamespace(prompt=q) for q in prompts]
    fresh = [str(ref.draw(q)) for q in prompts]
    c = ctrl.details(problems, fresh)["calibrated"].double()
    se = float(c.std() / len(c) ** 0.5)
    assert abs(float(c.mean()) - 0.5) < 4 * se


def test_build_reward_follows_the_recipe(tmp_path):
    task = AdditionTask(3)
    assert isinstance(build_reward(load_recipe(None, []), task), CheckerReward)
    assert isinstance(build_reward(load_recipe(None, ["reward.kind=graded"]), task), GradedReward)
    path = _write(tmp_path, "def r(prompt, completion):\n    return 1\n")
    recipe = load_recipe(None, ["reward.kind=python", f"reward.function={path}:r"])
    assert isinstance(build_reward(recipe, task), PythonReward)


def test_reward_section_errors_name_the_key():
    with pytest.raises(RecipeError, match="reward.function is required"):
        load_recipe(None, ["reward.kind=python"])
    with pytest.raises(RecipeError, match="reward.model is required"):
        load_recipe(None, ["reward.kind=model"])
    with pytest.raises(RecipeError, match="set reward.calibrate: true"):
        load_recipe(None, ["reward.transform=exp"])
    with pytest.raises(RecipeError, match="reward.reference_samples"):
        load_recipe(None, ["reward.reference_samples=0"])


# ---------------------------------------------------------------- CTRL inside the RL stage


def _ctrl_recipe(init, *overrides):
    return load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={init}",
            "train.stage=rl",
            "rl.algorithm=rloo",
            "rl.group_size=2",
            "rl.prompts_per_step=8",
            "rl.temperature=1.0",
            "reward.kind=graded",
            "reward.calibrate=true",
            "reward.reference_samples=8",
            "train.steps=4",
            "train.log_every=1",
            "train.eval_every=1000",
            "train.checkpoint_every=2",
            "optim.warmup_steps=0",
            "eval.n=4",
            *overrides,
        ],
    )


def test_rl_with_ctrl_logs_raw_and_calibrated_rewards(tiny_checkpoint, tmp_path):
    train(_ctrl_recipe(tiny_checkpoint, "reward.transform=exp"), tmp_path / "run", False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    assert len(rows) == 4
    for r in rows:
        assert 0.0 <= r["reward_raw"] <= 1.0 and 0.0 <= r["reward_calibrated"] <= 1.0
        # Φ = e^{7·(C − 1)} (N = 4): between e^−7 and 1
        assert math.exp(-7.0) - 1e-6 <= r["reward"] <= 1.0


def test_a_prompt_pool_fills_the_cache_once_up_front(tiny_checkpoint, monkeypatch):
    from tether.engine.setup import build_policy
    from tether.stages.rl import RLStage

    recipe = _ctrl_recipe(tiny_checkpoint, "rl.prompt_pool=3")
    model, tok = build_policy(recipe)
    calls = []
    original = RLStage._sample_reference

    def spy(self, prompts, k):
        calls.append((len(prompts), k))
        return original(self, prompts, k)

    monkeypatch.setattr(RLStage, "_sample_reference", spy)
    stage = RLStage(recipe, tok, model, torch.device("cpu"))
    # first-digit has a single prompt: the pool of 3 is one distinct prompt, sampled K times
    assert calls == [(1, 8)]
    stage.next_batch()
    stage.next_batch()
    assert calls == [(1, 8)]


def test_rl_with_ctrl_resumes_exactly(tiny_checkpoint, tmp_path, monkeypatch):
    from test_reliability import assert_resume_is_exact
    from tether.stages.rl import RLStage

    assert_resume_is_exact(_ctrl_recipe(tiny_checkpoint), RLStage, tmp_path, monkeypatch)
