"""tether.models.fused: RoPE and RMSNorm in fewer passes, the same values and gradients as
Hugging Face's Llama, on the switched model only."""

import copy

import pytest
import torch
from transformers.models.llama import modeling_llama

from tether.config import load_recipe
from tether.engine.setup import enable_activation_checkpointing, prepare_models
from tether.models import fused
from tether.models.loading import build_model, char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def rotate_by_hand(x, cos, sin):
    """RoPE as Hugging Face writes it: x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def toy_llama(layers=2, seed=0):
    torch.manual_seed(seed)
    model = build_model(char_tokenizer(), "llama", n_layer=layers, n_head=4, n_embd=32)
    return model.train()


def test_rotation_values_and_gradients_by_hand_and_by_finite_differences():
    torch.manual_seed(0)
    # a transposed view, as the attention passes it ([B, H, L, D] over a [B, L, H, D] buffer)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    # general cos and sin (the two halves differ), broadcast over heads
    cos, sin = torch.randn(2, 3, 1, 5, 8, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(fused.rotate(x, cos, sin), rotate_by_hand(x, cos, sin))
    assert torch.autograd.gradcheck(lambda t: fused.rotate(t, cos, sin), (x,))
    g = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad(fused.rotate(x, cos, sin), x, g)
    (theirs,) = torch.autograd.grad(rotate_by_hand(x, cos, sin), x, g)
    torch.testing.assert_close(ours, theirs)
    # a rotation by θ is undone by the rotation by −θ
    theta = torch.rand(5, 4, dtype=torch.float64) * 6
    c, s = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    torch.testing.assert_close(fused.rotate(fused.rotate(x, c, s), c, -s), x)


def test_rotation_keeps_hugging_faces_dtypes_under_mixed_precision():
    x = torch.randn(2, 4, 6, 8).to(torch.bfloat16).requires_grad_()
    cos, sin = torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)  # fp32, as the model gives them
    out = fused.rotate(x, cos, sin)
    expected = rotate_by_hand(x.float(), cos, sin)
    assert out.dtype == rotate_by_hand(x, cos, sin).dtype == torch.float32
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_rms_norm_equals_hugging_faces_in_value_and_gradient():
    torch.manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x = torch.randn(4, 7, 16, requires_grad=True)
    g = torch.randn(4, 7, 16)
    theirs = norm(x)
    grads = torch.autograd.grad(theirs, (x, norm.weight), g)
    ours = fused.rms_norm(norm, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (x, norm.weight), g), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # bf16 input, fp32 weight: normalised in fp32, cast to bf16, then times the weight
    xb = x.detach().to(torch.bfloat16)
    assert fused.rms_norm(norm, xb).dtype == norm(xb).dtype
    torch.testing.assert_close(fused.rms_norm(norm, xb), norm(xb))
    # and the equation itself: w·x/√(mean(x²) + ε)
    by_hand = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_switched_model_gives_the_same_logits_and_gradients():
    plain = toy_llama()
    switched = copy.deepcopy(plain)
    assert fused.use_fused_ops(switched) == 2 * 3 + 1  # per layer 2 norms + attention; final
    ids = torch.randint(3, 40, (3, 12))
    logits, grads = _logits_and_grads(plain, ids)
    logits_f, grads_f = _logits_and_grads(switched, ids)
    torch.testing.assert_close(logits_f, logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the same with the activations recomputed in the backward pass
    enable_activation_checkpointing(switched)
    logits_c, grads_c = _logits_and_grads(switched, ids)
    torch.testing.assert_close(logits_c, logits_f)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grads_c[name], grad, msg=name)


def test_only_the_switched_model_runs_the_fused_ops(monkeypatch):
    plain, switched = toy_llama(), toy_llama()
    fused.use_fused_ops(switched)
    calls = []
    monkeypatch.setattr(fused, "rotate", lambda *a: calls.append(1) or rotate_by_hand(*a))
    ids = torch.randint(3, 40, (2, 9))
    plain(input_ids=ids)
    assert calls == []  # Hugging Face's RoPE and norms on the other model
    assert "forward" not in vars(plain.model.norm)
    switched(input_ids=ids)
    assert len(calls) == 2 * 2  # q and k in each of 2 layers


def test_models_without_llama_layers_are_left_as_they_are():
    torch.manual_seed(0)
    gpt2 = build_model(char_tokenizer(), "gpt2", n_layer=1, n_head=2, n_embd=16)
    assert fused.use_fused_ops(gpt2) == 0
    assert all("forward" not in vars(m) for m in gpt2.modules())


@pytest.mark.parametrize("flag", [True, False])
def test_prepare_models_switches_the_policy_and_reference_unless_told_not_to(tiny_checkpoint, flag):
    recipe = load_recipe(
        "xpo-addition",
        [f"model.init={tiny_checkpoint}", f"train.fused_ops={str(flag).lower()}"],
    )

    class Stage:  # the one hook prepare_models asks of a stage
        def __init__(self, reference):
            self.reference = reference

        def frozen_models(self):
            return [self.reference]

    policy, reference = toy_llama(1), toy_llama(1)
    prepare_models(policy, Stage(reference), recipe, torch.device("cpu"))
    for model in (policy, reference):
        norms = [m for m in model.modules() if isinstance(m, modeling_llama.LlamaRMSNorm)]
        assert norms and all(("forward" in vars(m)) == flag for m in norms)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_prepare_models_caches_frozen_casts_under_bf16_only(tiny_checkpoint, precision):
    """train.precision bf16 on the CPU: the policy's and the reference's Linear layers keep
    their frozen weights' bf16 casts (tether.engine.precision.cache_frozen_casts); fp32: left
    alone."""
    from tether.engine import precision as engine_precision

    recipe = load_recipe(
        "xpo-addition", [f"model.init={tiny_checkpoint}", f"train.precision={precision}"]
    )

    class Stage:
        def frozen_models(self):
            return [reference]

    policy, reference = toy_llama(1), toy_llama(1)
    prepare_models(policy, Stage(), recipe, torch.device("cpu"))
    for model in (policy, reference):
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        switched = [getattr(m, engine_precision._CACHED, False) for m in linears]
        assert linears and all(s == (precision == "bf16") for s in switched)
