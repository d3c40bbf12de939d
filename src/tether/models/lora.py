"""LoRA (``model.lora``): low-rank adapters on ``model.init``, for any stage.

With LoRA the policy is a ``peft`` model: every weight of ``model.init`` frozen, and beside
each adapted linear layer W a trainable pair A [r, in], B [out, r] (B starts at zero), so the
layer computes W x + (α/r)·B A x. Three things follow, all in this module:

* **the reference is the policy with its adapters off** (:class:`LoraReference`): peft's
  ``disable_adapter()`` context around a forward pass gives exactly ``model.init``'s outputs,
  so a KL-tethered stage holds one copy of the weights, not two;
* **sampling** reads weights directly in the fast runners of :mod:`tether.generation.runners`, which
  know plain ``transformers`` models only. :func:`plain_model` gives them one: a copy of the
  module tree that shares every tensor with the policy, where each adapted layer becomes a
  plain layer, with the merged weight W + (α/r)·B A for the policy (a transient copy of the
  adapted weights, freed when sampling ends) or with W itself for the reference (no copy);
* **checkpoints** (:func:`save_model`) hold the merged weights as an ordinary
  ``save_pretrained`` folder (``AutoModelForCausalLM.from_pretrained`` loads it; the live
  model is left unmerged) plus the adapter in ``adapter/`` (``PeftModel.from_pretrained(base,
  folder / "adapter")``); ``--resume`` reloads the adapter weights (:func:`load_adapter`).

``peft`` is imported only when a recipe asks for LoRA (``pip install 'tether[lora]'``).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tether.config import LoraConfig, Recipe, RecipeError
from tether.models.loading import eval_mode, load_frozen_reference, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_DIR = "adapter"  # the adapter of a LoRA checkpoint, beside its merged weights


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft model (without importing peft when nothing has)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# ----------------------------------------------------------------------------- adding adapters


# the layers adapters can go on: nn.Linear, and GPT-2's Conv1D (a linear layer storing W as [in, out])
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def _check_targets(model: Any, names: list[str]) -> None:
    """RecipeError naming ``model.lora.target_modules`` unless each name (a module name or its
    ending, as peft matches them) finds a linear layer whose weight is its own (not tied)."""
    modules: dict[str, Any] = dict(model.named_modules())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in modules.items()
            if isinstance(m, LINEAR_TYPES) and m is not output
        }
    )
    uses: dict[int, int] = {}  # how many modules hold each weight: tied embeddings are held twice
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for key in names:
        found = [m for n, m in modules.items() if n == key or n.endswith("." + key)]
        if not found:
            raise RecipeError(
                f"model.lora.target_modules: no module named {key!r} in this model "
                f"(its linear layers: {', '.join(layers)})"
            )
        for m in found:
            if not isinstance(m, LINEAR_TYPES):
                raise RecipeError(
                    f"model.lora.target_modules: {key!r} is a {type(m).__name__}, not a linear "
                    f"layer (the linear layers: {', '.join(layers)})"
                )
            if uses.get(id(m.weight), 0) > 1:
                raise RecipeError(
                    f"model.lora.target_modules: {key!r} shares its weight with another layer "
                    "(tied embeddings): adapters there would untie them"
                )


def with_adapters(model: PreTrainedModel, cfg: LoraConfig) -> Any:
    """``model`` (modified in place) wrapped as a peft model with fresh adapters: only the
    adapters require grad. ``target_modules`` null: every linear layer but the LM head."""
    try:
        import peft
    except ImportError:
        raise RecipeError("model.lora needs the peft package: pip install 'tether[lora]'") from None

    if cfg.target_modules is not None:
        _check_targets(model, cfg.target_modules)
    config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft types it int; a float scales too
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules else "all-linear",
        # GPT-2's Conv1D stores W as [in, out]: peft transposes B A for it
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question: not ours
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return peft.get_peft_model(model, config)


# ----------------------------------------------------------------------------- the reference


class LoraReference(nn.Module):
    """π_ref of a LoRA run: the policy with its adapters disabled (peft's ``disable_adapter()``),
    used like the frozen reference it replaces: called for logits, under no_grad and in eval
    mode (no dropout, whatever mode the policy is in), and sampled from (:func:`plain_model`).
    It holds no weights of its own: ``parameters()`` are the policy's frozen base weights."""

    policy: Any  # not a submodule: train() and eval() stay the reference's own

    def __init__(self, policy: Any) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)
        self.eval()

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def device(self) -> torch.device:
        return model_device(self)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return _base_parameters(self.policy)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy
        # a frozen reference never drops out
        with eval_mode(policy), torch.no_grad(), policy.disable_adapter():
            return policy(*args, **kwargs)


def reference_policy(recipe: Recipe, policy: Any, device: torch.device) -> nn.Module:
    """The reference π_ref of a KL-tethered stage: ``model.init`` itself. Under LoRA that is
    the policy with its adapters off (no second copy of the weights); otherwise a second,
    frozen copy loaded from ``model.init``."""
    assert recipe.model.init is not None  # the recipe validator says so for these stages
    if recipe.model.lora is not None:
        return LoraReference(policy)
    return load_frozen_reference(recipe.model.init, device=device)


class FrozenAdapters(nn.Module):
    """A frozen copy of a LoRA policy that copies only the adapters: it samples as the policy
    did when the copy was taken (DPG's adaptive proposal), sharing the base weights.
    ``load_state_dict`` takes the policy's own state dict (or this one's) to update it."""

    policy: Any

    def __init__(self, policy: Any) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)
        self.weights = {
            n: p.detach().clone() for n, p in policy.named_parameters() if _is_adapter(n)
        }
        self.eval()

    @property
    def config(self) -> Any:
        return self.policy.config

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return _base_parameters(self.policy)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {n: w.clone() for n, w in self.weights.items()}

    @torch.no_grad()
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        for name, w in self.weights.items():
            w.copy_(state_dict[name])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return plain_model(self)(*args, **kwargs)


def frozen_copy(policy: Any) -> nn.Module:
    """A frozen snapshot of the policy to sample from: its adapters alone under LoRA, else a
    deep copy. Update it with ``snapshot.load_state_dict(policy.state_dict())``."""
    if is_lora(policy):
        return FrozenAdapters(policy)
    snapshot = copy.deepcopy(policy).eval()
    for p in snapshot.parameters():
        p.requires_grad_(False)
    return snapshot


def _is_adapter(name: str) -> bool:
    return ".lora_" in name


def _base_parameters(policy: Any) -> Iterator[nn.Parameter]:
    return (p for n, p in policy.named_parameters() if not _is_adapter(n))


# ----------------------------------------------------------------------------- plain models


def plain_model(model: Any) -> Any:
    """The plain ``transformers`` model that computes what ``model`` computes, for code that
    reads weights itself (the fast samplers, ``save_pretrained``). ``model`` itself unless it
    is a LoRA policy, reference or frozen copy; then a copy of the module tree in eval mode that
    shares every tensor, each adapted layer replaced by a plain one: its base weight for the
    reference (no new tensor), the merged W + (α/r)·B A otherwise (one new tensor per layer)."""
    if isinstance(model, LoraReference):
        return _plain_tree(model.policy, adapters=False)
    if isinstance(model, FrozenAdapters):
        return _plain_tree(model.policy, adapters=True, weights=model.weights)
    if is_lora(model):
        return _plain_tree(model, adapters=True)
    return model


@torch.no_grad()
def _plain_tree(
    peft_model: Any, adapters: bool, weights: Mapping[str, Tensor] | None = None
) -> nn.Module:
    from peft.tuners.lora import LoraLayer

    names = {id(m): n for n, m in peft_model.named_modules()}

    def swap(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, LoraLayer):
            return None
        layer: Any = module
        if layer.merged:
            raise ValueError(
                "tether.models.lora: adapters merged into the live weights are not supported"
            )
        plain = _shallow_copy(layer.get_base_layer())
        if not adapters or layer.disable_adapters:
            return plain
        base: Tensor = layer.weight
        weight = base.float()
        prefix = names[id(layer)]
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if weights is None:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            else:
                a = weights[f"{prefix}.lora_A.{adapter}.weight"]
                b = weights[f"{prefix}.lora_B.{adapter}.weight"]
            delta = b.float() @ a.float()  # [out, in]; Conv1D keeps W as [in, out]
            weight = weight + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[adapter]
        plain._parameters["weight"] = nn.Parameter(weight.to(base.dtype), requires_grad=False)
        return plain

    view = _copy_tree(peft_model.get_base_model(), swap)
    return view.eval()


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s tensors and children (its own dicts of them,
    so changing the copy's leaves the original alone)."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def _copy_tree(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """``module``'s tree, every module a shallow copy, ``swap(m)`` in place of m where it gives
    one (and not descending into it)."""
    clone = _shallow_copy(module)
    for name, child in module._modules.items():
        if child is not None:
            clone._modules[name] = swap(child) or _copy_tree(child, swap)
    return clone


# ----------------------------------------------------------------------------- checkpoints


def save_model(model: Any, folder: Path) -> None:
    """``save_pretrained`` into ``folder``; for a LoRA policy the merged weights (a plain
    checkpoint), and the adapter alone in ``folder/adapter``. The live model is not changed."""
    if not is_lora(model):
        model.save_pretrained(folder)
        return
    plain_model(model).save_pretrained(folder)
    # the embeddings never carry adapters here (targets are linear layers): save none of them
    model.save_pretrained(folder / ADAPTER_DIR, save_embedding_layers=False)


def load_adapter(model: Any, checkpoint: Path) -> None:
    """Load the adapter weights of ``checkpoint/adapter`` into a LoRA policy, in place (the
    optimizer keeps its parameters); the base weights are ``model.init``'s already."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    device = model_device(model)
    weights = load_peft_weights(str(checkpoint / ADAPTER_DIR), device=str(device))
    result: Any = set_peft_model_state_dict(model, weights)
    odd = list(result.unexpected_keys) + [k for k in result.missing_keys if _is_adapter(k)]
    if odd:
        raise ValueError(
            f"{checkpoint / ADAPTER_DIR}: the adapter does not fit this model ({odd[0]}): "
            "was it trained with another model.lora?"
        )


def held_parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of parameter storage that ``modules`` hold together, each storage counted once
    (a LoRA reference shares its weights with the policy, so it adds nothing)."""
    storages: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            storage = p.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
