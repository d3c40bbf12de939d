"""Memory on larger models: activation checkpointing recomputes each layer in the backward pass
and leaves the gradients as they are (with and without LoRA), a model without the support is
one line naming the key, and summary.json and the logged figures report the peak memory."""

import json

import pytest
import torch

from tether.config import RecipeError, load_recipe
from tether.engine.loop import train
from tether.engine.memory import peak_memory, peak_rss_mb
from tether.engine.setup import build_policy, seed_everything
from tether.stages.base import make_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(init, *overrides):
    return load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={init}",
            "train.stage=rl",
            "rl.prompts_per_step=4",
            "train.steps=1",
            "train.log_every=1",
            "eval.n=2",
            *overrides,
        ],
    )


def _gradients_and_layer_passes(recipe):
    """The gradients of one RL loss on a fixed batch, and how often the first decoder layer
    ran (a checkpointed layer runs again in the backward pass: its MLP is counted)."""
    seed_everything(0)
    model, tokenizer = build_policy(recipe)
    stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
    batch = stage.next_batch()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    calls = []
    mlp = base.model.layers[0].mlp
    forward = mlp.forward  # counted by hand: module hooks do not run in the recomputation

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    loss, _ = stage.loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls)


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_recomputes_and_keeps_the_gradients(lora, tiny_checkpoint):
    more = ["model.lora.r=4"] if lora else []
    plain, plain_passes = _gradients_and_layer_passes(_recipe(tiny_checkpoint, *more))
    ckpt, ckpt_passes = _gradients_and_layer_passes(
        _recipe(tiny_checkpoint, *more, "train.activation_checkpointing=true")
    )
    assert ckpt_passes == 2 * plain_passes  # every forward pass of the layer runs again
    assert plain.keys() == ckpt.keys()
    for name, g in plain.items():
        # the adapters get their gradients too (B's: A's are 0 while B starts at 0)
        if not lora or "lora_B" in name:
            assert float(ckpt[name].abs().max()) > 0, name
        assert torch.allclose(g, ckpt[name], rtol=1e-5, atol=1e-8), name


def test_a_model_without_checkpointing_is_refused_in_one_line(tiny_checkpoint, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    recipe = _recipe(tiny_checkpoint, "train.activation_checkpointing=true")
    with pytest.raises(RecipeError) as err:
        build_policy(recipe)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train.activation_checkpointing: the model (LlamaForCausalLM)")


def test_peak_memory_is_in_the_summary_and_the_logged_figures(tiny_checkpoint, tmp_path):
    summary = train(
        _recipe(tiny_checkpoint, "train.activation_checkpointing=true"),
        tmp_path / "run",
        progress=False,
    )
    assert summary["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["peak_rss_mb"] > 0
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["peak_rss_mb"] for r in rows if "loss" in r]
    assert logged and all(0 < v <= summary["peak_rss_mb"] for v in logged)


def test_peak_rss_is_this_process_in_mib():
    """ru_maxrss is in kilobytes on Linux: the figure is MiB, and at least what a fresh
    100 MiB tensor just held."""
    x = torch.ones(100 * 2**20 // 4)  # 100 MiB, touched
    assert float(x.sum()) > 0
    assert 100 < peak_rss_mb() < 1_000_000
    assert "cuda_peak_allocated_mb" not in peak_memory(torch.device("cpu"))
