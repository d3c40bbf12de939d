"""train.sampler vllm, tested on CPU against a fake ``vllm`` module put in ``sys.modules``: its
``LLM.generate`` completes prompts by a known rule and its model records every weight load.
The real vLLM is exercised by tests/test_gpu.py on a GPU."""

import json
import os
import sys
import types

import pytest
import torch

from tether.config import RecipeError, load_recipe
from tether.engine.loop import train
from tether.generation.sampler import pad_id
from tether.generation.vllm import VLLMRolloutBackend
from tether.models.loading import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


class FakeEngineModel:
    def __init__(self, events):
        self.events = events
        self.loads = []

    def load_weights(self, weights):
        state = {name: w.detach().clone() for name, w in weights}
        self.loads.append(state)
        self.events.append("load")


class FakeLLM:
    """Completion of request i: ``1 + seed % max_tokens`` tokens drawn by a fixed walk over
    the allowed ids (EOS excluded), the last one replaced by EOS (finish "stop") unless the
    completion reaches max_tokens (finish "length")."""

    instances: list = []

    def __init__(self, **kwargs):
        assert os.path.isfile(os.path.join(kwargs["model"], "config.json"))
        assert os.path.isfile(os.path.join(kwargs["model"], "tokenizer.json"))
        self.kwargs = kwargs
        self.events = []
        model = FakeEngineModel(self.events)
        runner = types.SimpleNamespace(model=model)
        worker = types.SimpleNamespace(model_runner=runner)
        executor = types.SimpleNamespace(driver_worker=worker)
        self.llm_engine = types.SimpleNamespace(model_executor=executor)
        self.model = model
        self.requests = []
        FakeLLM.instances.append(self)

    def reset_prefix_cache(self):
        self.events.append("reset")
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.events.append("generate")
        assert len(prompts) == len(sampling_params)
        results = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            self.requests.append((prompt, params))
            results.append(completion(prompt["prompt_token_ids"], params))
        return results


def completion(prompt_ids, params):
    """The fake's rule (module docstring), as a RequestOutput-like object."""
    assert params.ignore_eos and len(params.stop_token_ids) == 1 and not params.detokenize
    eos = params.stop_token_ids[0]
    pool = [t for t in (params.allowed_token_ids or range(3, 99)) if t != eos]
    seed = params.seed or 0  # None: an unseeded request
    n = 1 + seed % params.max_tokens
    ids = [pool[(seed + 7 * k + len(prompt_ids)) % len(pool)] for k in range(n)]
    stopped = n < params.max_tokens
    if stopped:
        ids[-1] = eos
    out = types.SimpleNamespace(token_ids=ids, finish_reason="stop" if stopped else "length")
    return types.SimpleNamespace(outputs=[out])


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.allowed_token_ids = None
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances = []
    saved = dict(os.environ)  # the backend sets the launcher's RANK, WORLD_SIZE...
    yield module
    os.environ.clear()
    os.environ.update(saved)


def _recipe(init, *overrides, stage="rl"):
    return load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={init}",
            f"train.stage={stage}",
            "train.sampler=vllm",
            "train.log_every=1",
            "train.eval_every=1000",
            "optim.warmup_steps=0",
            "eval.n=4",
            *overrides,
        ],
    )


def _policy(init):
    policy, tok = load_model_and_tokenizer(str(init))
    policy.train()
    return policy, tok


def _row_logprobs(model, prompt, completion_ids, temperature, allowed=None):
    """log π(y_t | x, y_<t) of one unpadded row, one forward pass, computed plainly."""
    ids = torch.tensor([prompt + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logits = logits[len(prompt) - 1 : len(ids[0]) - 1]
    if allowed is not None:
        outside = torch.ones(logits.shape[-1], dtype=torch.bool)
        outside[allowed] = False
        logits = logits.masked_fill(outside, -torch.inf)
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(len(completion_ids)), torch.tensor(completion_ids)]


@pytest.mark.parametrize("allowed", [None, [1, 20, 21, 22, 23]])
def test_sample_output_holds_vllms_tokens_and_the_policys_logprobs(
    fake_vllm, tiny_checkpoint, allowed
):
    recipe = _recipe(tiny_checkpoint, "train.precision=bf16")
    policy, tok = _policy(tiny_checkpoint)
    rollouts = VLLMRolloutBackend(recipe, policy, tok, CPU)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["gpu_memory_utilization"] == 0.3
    prompts = ["1+2=", "31+4=", "7=", "1+2="]
    gen = torch.Generator().manual_seed(0)
    out = rollouts(
        policy, prompts, max_new_tokens=5, temperature=1.5, generator=gen, allowed_token_ids=allowed
    )
    assert policy.training  # put back in train mode
    pad = pad_id(tok)
    prompt_rows = [tok(p)["input_ids"] for p in prompts]
    assert [request["prompt_token_ids"] for request, _ in llm.requests] == prompt_rows
    expected = [
        completion(ids, params) for ids, (_, params) in zip(prompt_rows, llm.requests, strict=True)
    ]
    seeds = [params.seed for _, params in llm.requests]
    assert len(set(seeds)) == 4  # the repeated prompt gets its own seed
    assert out.finished == [e.outputs[0].finish_reason == "stop" for e in expected]
    P = max(len(r) for r in prompt_rows)
    for i, (row, e) in enumerate(zip(prompt_rows, expected, strict=True)):
        ids = e.outputs[0].token_ids
        # prompts left-padded, completions right-padded, as sample() lays them out
        assert out.prompt_ids[i].tolist() == [pad] * (P - len(row)) + row
        assert out.prompt_mask[i].tolist() == [0] * (P - len(row)) + [1] * len(row)
        n = len(ids)
        assert out.completion_ids[i, :n].tolist() == ids
        assert out.completion_mask[i].tolist() == [1] * n + [0] * (out.completion_ids.shape[1] - n)
        assert (out.completion_ids[i, n:] == pad).all() and (out.logprobs[i, n:] == 0).all()
        assert out.texts[i] == tok.decode(ids, skip_special_tokens=True)
        # the log-probs are the policy's (its bf16 forward), not vLLM's
        want = _row_logprobs(policy, row, ids, 1.5, allowed)
        assert out.logprobs.dtype == torch.float32
        torch.testing.assert_close(out.logprobs[i, :n], want, atol=1e-5, rtol=0)


def test_weights_are_synced_before_each_rollout(fake_vllm, tiny_checkpoint):
    policy, tok = _policy(tiny_checkpoint)
    rollouts = VLLMRolloutBackend(_recipe(tiny_checkpoint), policy, tok, CPU)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["dtype"] == "float32" and llm.events == []
    kw = {"max_new_tokens": 3, "temperature": 1.0, "generator": None}
    rollouts(policy, ["1+1="], **kw)
    with torch.no_grad():  # an optimizer step
        for p in policy.parameters():
            p.add_(0.01)
    rollouts(policy, ["1+1="], **kw)
    assert llm.events == ["load", "reset", "generate"] * 2
    for state in llm.model.loads:
        assert set(state) == {n for n, _ in policy.named_parameters()}
    first, second = llm.model.loads
    for name, p in policy.named_parameters():
        assert torch.equal(second[name], p.detach())
        assert torch.equal(first[name] + 0.01, p.detach())


def _losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in lines if '"loss"' in r]


@pytest.mark.parametrize(
    "stage, overrides",
    [
        ("rl", ["rl.algorithm=ppo", "rl.prompts_per_step=4", "rl.ppo_epochs=2"]),
        ("xpo", ["train.batch_size=4"]),
        ("online-dpo", ["train.batch_size=4", "preference.pair_with=policy"]),
        ("dpg", ["task.name=enumerable", "task.max_digits=2", "dpg.samples_per_step=4"]),
        ("iqlearn", ["train.batch_size=4", "imitation.online_fraction=0.5"]),
    ],
)
def test_every_sampling_stage_trains_on_vllm_rollouts(
    fake_vllm, tiny_checkpoint, tmp_path, stage, overrides
):
    """One vLLM built per run, its weights refreshed from the policy before each step's policy
    rollout (twice for online-dpo paired with a second policy sample), and the stage trains."""
    steps = 3
    recipe = _recipe(tiny_checkpoint, f"train.steps={steps}", *overrides, stage=stage)
    train(recipe, tmp_path / "run", progress=False)
    (llm,) = FakeLLM.instances
    per_step = 2 if stage == "online-dpo" else 1
    assert llm.events == ["load", "reset", "generate"] * steps * per_step
    assert len(_losses(tmp_path / "run")) == steps
    loads = llm.model.loads
    trained = [not torch.equal(loads[0][n], loads[-1][n]) for n in loads[0]]
    assert any(trained)  # the later rollouts saw the trained weights
    if stage == "dpg":  # the enumerable task: vLLM was told the task's vocabulary
        assert all(params.allowed_token_ids for _, params in llm.requests)


def test_without_vllm_the_error_is_one_line_naming_the_key(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RecipeError) as err:
        train(_recipe(tiny_checkpoint, "train.steps=1"), tmp_path / "run", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train.sampler vllm: the vllm package is not installed")
    assert "pip install vllm" in message
    assert not (tmp_path / "run").exists()  # nothing written


def test_sampler_vllm_needs_a_stage_that_samples(tiny_checkpoint):
    with pytest.raises(RecipeError, match="train.sampler vllm: train.stage mle draws no samples"):
        load_recipe(None, ["train.sampler=vllm"])
    with pytest.raises(RecipeError, match="train.stage iqlearn draws no samples"):
        load_recipe(None, ["train.sampler=vllm", "train.stage=iqlearn"])
    load_recipe(
        None, ["train.sampler=vllm", "train.stage=iqlearn", "imitation.online_fraction=0.5"]
    )
