"""LoRA (``model.lora``): the reference is the policy with its adapters off (exactly
``model.init``, with no second copy of the weights), only the adapters train, sampling includes
the adapters for the policy and leaves them out for the reference, checkpoints are plain
``from_pretrained`` folders plus the adapter, resume is exact, and every stage runs."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from test_reliability import RL, assert_resume_is_exact
from tether.cli import app
from tether.config import RecipeError, load_recipe
from tether.engine.checkpoints import save_checkpoint
from tether.engine.loop import train
from tether.engine.setup import build_policy, make_optimizer
from tether.generation.sampler import sample
from tether.models.loading import build_model, char_tokenizer, load_model_and_tokenizer
from tether.models.lora import (
    FrozenAdapters,
    LoraReference,
    frozen_copy,
    held_parameter_bytes,
    plain_model,
    reference_policy,
)
from tether.objectives import mle_loss, shifted_token_logprobs
from tether.stages.base import make_stage

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoint(request, tmp_path_factory):
    """A random 2-layer model with the char tokenizer, saved (Llama: nn.Linear, tied
    embeddings; GPT-2: Conv1D)."""
    d = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    tok = char_tokenizer(model_max_length=64)
    model = build_model(tok, arch=request.param, n_layer=2, n_head=2, n_embd=32, max_positions=64)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def lora_recipe(init, *overrides):
    return load_recipe(
        None,
        [
            f"model.init={init}",
            "task.max_digits=1",
            "train.batch_size=4",
            "model.lora.r=4",
            "model.lora.dropout=0.1",
            "optim.lr=0.05",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )


def logprobs(model, ids):
    return shifted_token_logprobs(model(input_ids=ids).logits, ids)


def tokens(n=4, length=12, seed=1):
    return torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))


def mle_steps(policy, recipe, steps=3):
    """A few optimizer steps of MLE on random tokens, the policy in train mode (dropout on)."""
    optimizer = make_optimizer(policy, recipe)
    policy.train()
    for i in range(steps):
        ids = tokens(seed=10 + i)
        loss, _ = mle_loss(logprobs(policy, ids), torch.ones(ids.shape))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


# ---------------------------------------------------------------- the reference


def test_the_reference_is_the_base_checkpoint_exactly_before_and_after_training(checkpoint):
    recipe = lora_recipe(checkpoint)
    policy, _ = build_policy(recipe)
    reference = reference_policy(recipe, policy, CPU)
    assert isinstance(reference, LoraReference)
    base, _ = load_model_and_tokenizer(str(checkpoint))
    ids = tokens()
    with torch.no_grad():
        want = logprobs(base, ids)
        policy.train()  # the reference is called with the policy training: still no dropout
        assert torch.equal(logprobs(reference, ids), want)
        policy.eval()
        assert torch.equal(logprobs(policy, ids), want)  # B = 0 at the start
    mle_steps(policy, recipe)
    with torch.no_grad():
        policy.train()
        assert torch.equal(logprobs(reference, ids), want)
        assert policy.training  # the reference left the policy's mode alone
        policy.eval()
        assert not torch.allclose(logprobs(policy, ids), want, atol=1e-3)
    # the adapters are back on and still train after the reference's calls
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_the_reference_holds_no_second_copy_of_the_weights(checkpoint):
    recipe = lora_recipe(checkpoint, "train.stage=rl", "task.name=first-digit")
    policy, _ = build_policy(recipe)
    reference = reference_policy(recipe, policy, CPU)
    base, _ = load_model_and_tokenizer(str(checkpoint))
    base_ids = {id(p) for n, p in policy.named_parameters() if "lora_" not in n}
    assert {id(p) for p in reference.parameters()} == base_ids
    assert sum(p.numel() for p in reference.parameters()) == base.num_parameters()
    # bytes: policy + reference = base + adapters; without LoRA, a second copy of the base
    adapters = sum(p.numel() * 4 for n, p in policy.named_parameters() if "lora_" in n)
    assert held_parameter_bytes(policy, reference) == held_parameter_bytes(base) + adapters
    full = load_recipe(None, [f"model.init={checkpoint}", "train.stage=rl"])
    frozen = reference_policy(full, base, CPU)
    assert held_parameter_bytes(base, frozen) == 2 * held_parameter_bytes(base)


def test_only_the_adapters_train(checkpoint):
    recipe = lora_recipe(checkpoint)
    policy, _ = build_policy(recipe)
    optimizer = make_optimizer(policy, recipe)
    names = {id(p): n for n, p in policy.named_parameters()}
    trained = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    mle_steps(policy, recipe)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if ".lora_B." in n or ".lora_A." in n}
    # every block's linear layers have adapters; the LM head and the embeddings do not
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in changed}
    arch = policy.config.model_type
    want = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}
    assert layers == want.get(arch, {"c_attn", "c_proj", "c_fc"})


# ---------------------------------------------------------------- sampling


def test_sampling_includes_the_adapters_for_the_policy_and_not_for_the_reference(checkpoint):
    recipe = lora_recipe(checkpoint)
    policy, tokenizer = build_policy(recipe)
    mle_steps(policy, recipe)
    policy.eval()
    reference = reference_policy(recipe, policy, CPU)
    base, _ = load_model_and_tokenizer(str(checkpoint))
    prompts = ["1+2=", "7+5=", "3+9="] * 4

    def draw(model, fast=True):
        gen = torch.Generator().manual_seed(0)
        kw = {"max_new_tokens": 8, "temperature": 1.0, "generator": gen, "fast": fast}
        return sample(model, tokenizer, prompts, **kw)

    # the reference: the base model's samples exactly, fast runner or not
    for fast in (True, False):
        want, got = draw(base, fast), draw(reference, fast)
        assert got.texts == want.texts and torch.equal(got.logprobs, want.logprobs)
    # the policy: its own forward (the generic path) and the merged weights (fast) agree
    slow, fast = draw(policy, fast=False), draw(policy)
    assert slow.texts == fast.texts and slow.texts != want.texts
    torch.testing.assert_close(slow.logprobs, fast.logprobs, atol=1e-5, rtol=0)
    # the fast runners see a plain model of their own type, and the live model keeps its adapters
    view = plain_model(policy)
    assert type(view) is type(base) and isinstance(policy, PeftModel)
    assert not any("lora_" in n for n, _ in view.named_parameters())
    assert any("lora_" in n for n, _ in policy.named_parameters())


def test_sampling_a_lora_policy_keeps_only_what_the_next_call_can_reuse(checkpoint):
    """The fast sampler's prepared weights of a LoRA policy: the merged matrices are made for
    one call and what was prepared from them is dropped when it returns; the frozen LM head
    (no adapter) stays and is reused by the next call, which samples as a fresh one."""
    from tether.generation import weights

    recipe = lora_recipe(checkpoint)
    policy, tokenizer = build_policy(recipe)
    policy.eval()
    weights.release()
    prompts = ["1+2=", "7+5="]
    first = sample(policy, tokenizer, prompts, max_new_tokens=6)
    kept = {tag: entry[2] for tag, entry in weights._PREPARED.items()}
    if "llama" not in str(checkpoint):  # GPT-2's runner prepares nothing
        assert kept == {}
        return
    assert [tag[0] for tag in kept] == ["head"]  # every block linear has adapters
    again = sample(policy, tokenizer, prompts, max_new_tokens=6)
    assert weights._PREPARED[next(iter(kept))][2] is next(iter(kept.values()))
    assert torch.equal(first.logprobs, again.logprobs)
    weights.release()


def test_a_frozen_copy_of_a_lora_policy_copies_only_the_adapters(checkpoint):
    recipe = lora_recipe(checkpoint)
    policy, tokenizer = build_policy(recipe)
    snapshot = frozen_copy(policy)
    assert isinstance(snapshot, FrozenAdapters)
    assert held_parameter_bytes(policy, snapshot) == held_parameter_bytes(policy)
    ids = tokens()
    with torch.no_grad():
        then = logprobs(policy.eval(), ids)
    mle_steps(policy, recipe)
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(logprobs(snapshot, ids), then, atol=1e-5, rtol=0)
        snapshot.load_state_dict(policy.state_dict())  # the update DPG's adaptive proposal makes
        torch.testing.assert_close(
            logprobs(snapshot, ids), logprobs(policy, ids), atol=1e-5, rtol=0
        )


# ---------------------------------------------------------------- checkpoints


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's own
def test_a_checkpoint_holds_the_merged_model_and_the_adapter(checkpoint, tmp_path):
    recipe = lora_recipe(checkpoint)
    policy, tokenizer = build_policy(recipe)
    mle_steps(policy, recipe)
    policy.eval()
    live = {n: p.detach().clone() for n, p in policy.state_dict().items()}
    save_checkpoint(policy, tokenizer, tmp_path / "model", {"step": 3})
    # saving changed nothing in the live model: adapters unmerged, every tensor the same
    assert all(torch.equal(p, live[n]) for n, p in policy.state_dict().items())
    ids = tokens()
    with torch.no_grad():
        want = logprobs(policy, ids)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        assert not any("lora" in n for n in merged.state_dict())
        torch.testing.assert_close(logprobs(merged, ids), want, atol=1e-5, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(checkpoint)
        adapted = PeftModel.from_pretrained(base, tmp_path / "model" / "adapter").eval()
        assert torch.equal(logprobs(adapted, ids), want)


# ---------------------------------------------------------------- every stage, resume


STAGES = {
    "mle": ["eval.digits=[1]"],
    "iqlearn": ["eval.digits=[1]", "imitation.online_fraction=0.25"],
    "rl": [
        "task.name=first-digit",
        "rl.prompts_per_step=4",
        "reward.calibrate=true",  # samples from the reference
        "reward.reference_samples=2",
    ],
    "dpo": ["task.name=multistep-prefs"],
    "online-dpo": ["task.name=first-digit"],
    "xpo": ["task.name=first-digit"],
    "reward-model": ["task.name=multistep-prefs"],
    "dpg": [
        "task.name=enumerable",
        "task.max_digits=2",
        "dpg.samples_per_step=8",
        "dpg.proposal=adaptive",
    ],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_trains_with_lora(tiny_checkpoint, tmp_path, stage):
    recipe = lora_recipe(
        tiny_checkpoint,
        f"train.stage={stage}",
        "train.steps=2",
        "train.checkpoint_every=1",
        "eval.n=4",
        *STAGES[stage],
    )
    policy, tokenizer = build_policy(recipe)
    built = make_stage(recipe, tokenizer, policy, CPU)
    if stage not in ("mle", "iqlearn", "reward-model"):
        assert isinstance(built.reference, LoraReference)
    summary = train(recipe, tmp_path / "run", progress=False)
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 2
    for folder in (tmp_path / "run" / "model", tmp_path / "run" / "checkpoints" / "step-000001"):
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        merged = AutoModelForCausalLM.from_pretrained(folder)
        assert not any("lora" in n for n in merged.state_dict())
    meta = json.loads((tmp_path / "run" / "model" / "tether.json").read_text())
    assert meta["lora"]["r"] == 4


def test_lora_resume_is_exact(tiny_checkpoint, tmp_path, monkeypatch):
    """RL with a value head and adapter dropout: the adapters, the optimizer over them and
    the RNG that drives the dropout all survive a resume."""
    from tether.stages.rl import RLStage

    recipe = lora_recipe(tiny_checkpoint, *RL)  # A2C, as test_reliability's resume test
    cut, whole = assert_resume_is_exact(recipe, RLStage, tmp_path, monkeypatch)
    for name in ("model/model.safetensors", "model/adapter/adapter_model.safetensors"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes()


# ---------------------------------------------------------------- recipes


def test_recipes_check_the_lora_keys(tiny_checkpoint):
    init = f"model.init={tiny_checkpoint}"
    with pytest.raises(RecipeError, match="model.lora needs model.init"):
        load_recipe(None, ["model.lora.r=4"])
    with pytest.raises(RecipeError, match=r"model.lora.r: .*greater than or equal to 1"):
        load_recipe(None, [init, "model.lora.r=0"])
    with pytest.raises(RecipeError, match=r"model.lora.alpha: .*greater than 0"):
        load_recipe(None, [init, "model.lora.alpha=0"])
    with pytest.raises(RecipeError, match=r"model.lora.dropout: .*less than 1"):
        load_recipe(None, [init, "model.lora.dropout=1"])
    with pytest.raises(RecipeError, match=r"model.lora.rank: unknown key \(allowed: r, alpha"):
        load_recipe(None, [init, "model.lora.rank=4"])
    with pytest.raises(RecipeError, match="model.lora.target_modules: give at least one"):
        load_recipe(None, [init, "model.lora.target_modules=[]"])
    with pytest.raises(RecipeError, match="model.lora.target_modules: module names must not"):
        load_recipe(None, [init, "model.lora.target_modules=[q_proj, q_proj]"])
    assert load_recipe(None, [init, "model.lora={}"]).model.lora.r == 8  # every default
    assert load_recipe(None, [init]).model.lora is None


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("[q_proj, c_attn]", r"no module named 'c_attn' in this model \(its linear layers: "),
        ("[mlp]", "'mlp' is a LlamaMLP, not a linear layer"),
        ("[lm_head]", "'lm_head' shares its weight with another layer"),
    ],
)
def test_target_modules_that_do_not_fit_the_model_are_named(tiny_checkpoint, targets, message):
    recipe = lora_recipe(tiny_checkpoint, f"model.lora.target_modules={targets}")
    with pytest.raises(RecipeError, match=f"model.lora.target_modules: {message}"):
        build_policy(recipe)


def test_chosen_target_modules_get_the_only_adapters(tiny_checkpoint):
    recipe = lora_recipe(tiny_checkpoint, "model.lora.target_modules=[q_proj, v_proj]")
    policy, _ = build_policy(recipe)
    adapted = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in policy.named_parameters()
        if p.requires_grad
    }
    assert adapted == {"q_proj", "v_proj"}


def test_tether_train_with_lora_and_its_errors(tiny_checkpoint, tmp_path):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        f"model: {{init: {tiny_checkpoint}, lora: {{r: 2}}}}\n"
        "task: {max_digits: 1}\n"
        "train: {steps: 2, batch_size: 4}\n"
        "eval: {digits: [1], n: 2}\n"
    )

    def tether(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    bad = tether(
        "train", recipe, "--set", "model.lora.target_modules=[nope]", "--out", tmp_path / "bad"
    )
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert bad.output.strip() == (
        "error: model.lora.target_modules: no module named 'nope' in this model (its linear "
        "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)"
    )
    assert not (tmp_path / "bad").exists()
    ok = tether("train", recipe, "--quiet", "--out", tmp_path / "run")
    assert ok.exit_code == 0, ok.output
    shown = tether("sample", tmp_path / "run", "--prompt", "1+2=", "--json")
    assert shown.exit_code == 0, shown.output
