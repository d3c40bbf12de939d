"""tether.models.onednn_linear: fp32 linear layers through oneDNN on the CPU, the same values
and gradients as F.linear up to rounding, on the switched layers only and where it applies."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tether.bench.measure import count_flops
from tether.config import load_recipe
from tether.config.sections import LoraConfig
from tether.engine.setup import prepare_models
from tether.models import onednn_linear
from tether.models.loading import build_model, char_tokenizer
from tether.models.lora import with_adapters

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not onednn_linear.AVAILABLE, reason="this torch has no oneDNN"),
]


class Ops(TorchDispatchMode):
    """The names of the ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def products(self):
        return [
            n for n in self.names if n.split(".")[-1] in ("mm", "addmm", "bmm", "_linear_pointwise")
        ]


def test_values_and_gradients_equal_float64_ones_up_to_fp32_rounding():
    torch.manual_seed(0)
    # a 3-D input, a bias, every product a different shape
    x = torch.randn(3, 5, 7, requires_grad=True)
    w = torch.randn(4, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    g = torch.randn(3, 5, 4)
    with Ops() as ops:
        y = onednn_linear.linear(x, w, b)
        y.backward(g)
    # every product through oneDNN: forward, input gradient, weight gradient; none through mm
    assert ops.products() == ["mkldnn._linear_pointwise"] * 3
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = F.linear(xd, wd, bd)
    yd.backward(g.double())
    # x W^T + b; g W; g^T x; the sum of g over rows, each in float64
    assert torch.allclose(yd, torch.einsum("bsk,nk->bsn", xd, wd) + bd)
    for ours, exact in [(y, yd), (x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)]:
        assert ours.dtype == torch.float32 and ours.shape == exact.shape
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    gw = g.double().reshape(15, 4).T @ xd.detach().reshape(15, 7)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-5)


def test_a_strided_input_and_no_bias():
    torch.manual_seed(1)
    x = torch.randn(6, 9).T.requires_grad_()  # [9, 6], not contiguous
    w = torch.randn(5, 6, requires_grad=True)
    y = onednn_linear.linear(x, w)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    gx, gw = torch.autograd.grad(F.linear(x, w).square().sum(), (x, w))
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-5)


def test_frozen_weights_and_no_grad_take_oneDNN_without_a_graph():
    torch.manual_seed(2)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with Ops() as ops:
        y = onednn_linear.linear(x, w)
    assert ops.products() == ["mkldnn._linear_pointwise"] and y.grad_fn is None
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["float64", "bf16 weights", "autocast", "empty", "one dimension"])
def test_what_oneDNN_does_not_take_goes_through_F_linear(case):
    torch.manual_seed(3)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    if case == "float64":
        x, w = x.double(), w.double()
    elif case == "bf16 weights":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "empty":
        x = x[:0]
    elif case == "one dimension":
        x = x[0]
    with Ops() as ops:
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = onednn_linear.linear(x, w)
            assert y.dtype == torch.bfloat16  # autocast's cast, as F.linear gives it
        else:
            y = onednn_linear.linear(x, w)
    assert "mkldnn._linear_pointwise" not in ops.products()
    assert not onednn_linear.takes(x, w, None) or case == "autocast"


def toy_llama(seed=0):
    torch.manual_seed(seed)
    return build_model(char_tokenizer(), "llama", n_layer=2, n_head=4, n_embd=32).train()


def test_a_switched_model_gives_the_same_logits_and_gradients_through_oneDNN():
    plain = toy_llama()
    switched = copy.deepcopy(plain)
    # 7 projections in each of 2 layers, and the LM head
    assert onednn_linear.use_onednn_linear(switched) == 2 * 7 + 1
    ids = torch.randint(3, 40, (3, 12))
    results = []
    for model in (plain, switched):
        model.zero_grad(set_to_none=True)
        with Ops() as ops:
            logits = model(input_ids=ids, use_cache=False).logits
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logits.detach(), grads, ops.products()))
    (logits, grads, plain_ops), (logits_s, grads_s, switched_ops) = results
    assert "mkldnn._linear_pointwise" not in plain_ops
    # 15 layers, each forward + input gradient + weight gradient; the tied LM head's too
    assert switched_ops.count("mkldnn._linear_pointwise") == 15 * 3
    assert not {"aten.mm", "aten.addmm"} & set(switched_ops)
    torch.testing.assert_close(logits_s, logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert switched.state_dict().keys() == plain.state_dict().keys()


def test_lora_adapters_and_the_layers_they_wrap_are_switched():
    model = with_adapters(toy_llama(), LoraConfig(r=2))
    # per layer 7 wrapped projections and their A and B, and the LM head
    assert onednn_linear.use_onednn_linear(model) == 2 * 7 * 3 + 1
    ids = torch.randint(3, 40, (2, 6))
    with Ops() as ops:
        model(input_ids=ids).logits.sum().backward()
    # frozen layers: forward and input gradient; adapters A and B: and their weight
    # gradients; but layer 0's q, k and v read the embeddings, which need no gradient (their
    # base layer runs the forward only, their A the forward and weight gradient)
    n = ops.products().count("mkldnn._linear_pointwise")
    assert n == 2 * 7 * (2 + 3 + 3) + 2 - 3 * (1 + 1)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_flops_are_counted_for_oneDNN_products():
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    flops, _ = count_flops(lambda: onednn_linear.linear(x, w).sum().backward())
    assert flops == 3 * 2 * 10 * 8 * 6


@pytest.mark.parametrize(
    ("vendor", "capability", "faster"),
    [
        ("AuthenticAMD", "AVX512", True),  # MKL runs AVX2 there: measured 2.0-2.3x
        ("AuthenticAMD", "AVX2", False),  # both AVX2: oneDNN measured 10-35% slower
        ("GenuineIntel", "AVX512", False),  # MKL's own AVX-512: not measured, left to MKL
        ("", "AVX512", False),  # no vendor string (not x86 Linux)
        ("AuthenticAMD", "DEFAULT", False),
    ],
)
def test_auto_switches_where_oneDNN_was_measured_faster(vendor, capability, faster):
    assert onednn_linear.faster_here(vendor, capability) is faster


def test_the_setting_resolves_true_false_and_auto():
    assert onednn_linear.wanted(True) and not onednn_linear.wanted(False)
    assert onednn_linear.wanted("true") and not onednn_linear.wanted("false")  # a CLI's
    assert onednn_linear.wanted("auto") is onednn_linear.faster_here()
    with pytest.raises(ValueError, match="'maybe': choose from auto, true, false"):
        onednn_linear.wanted("maybe")
    vendor = onednn_linear.cpu_vendor()
    assert vendor is None or vendor in open("/proc/cpuinfo").read()


def test_off_by_default(tiny_checkpoint):
    """Memory grows with every new batch shape under oneDNN (module docstring): opt-in."""
    recipe = load_recipe("xpo-addition", [f"model.init={tiny_checkpoint}"])
    assert recipe.train.onednn_linear is False and not onednn_linear.wanted(False)


def test_a_bad_setting_is_one_line_naming_the_field(tiny_checkpoint):
    from tether.config import RecipeError

    with pytest.raises(RecipeError, match="train.onednn_linear"):
        load_recipe("xpo-addition", [f"model.init={tiny_checkpoint}", "train.onednn_linear=maybe"])


@pytest.mark.parametrize(
    ("precision", "flag", "switched"),
    [
        ("fp32", "true", True),
        ("fp32", "false", False),
        ("bf16", "true", False),
        ("fp32", "auto", onednn_linear.faster_here()),
    ],
)
def test_prepare_models_switches_fp32_models_on_the_cpu_unless_told_not_to(
    tiny_checkpoint, precision, flag, switched
):
    recipe = load_recipe(
        "xpo-addition",
        [
            f"model.init={tiny_checkpoint}",
            f"train.precision={precision}",
            f"train.onednn_linear={flag}",
        ],
    )

    class Stage:
        def frozen_models(self):
            return [reference]

    policy, reference = toy_llama(), toy_llama()
    prepare_models(policy, Stage(), recipe, torch.device("cpu"))
    for model in (policy, reference):
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        forwards = {getattr(m.forward, "__func__", None) for m in linears}
        assert (forwards == {onednn_linear._forward}) == switched
