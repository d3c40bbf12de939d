"""The GPU path, on a CUDA device: every stage trains on the GPU in fp32 and bf16 (a tensor left
on the CPU fails the run), bf16 log-probs stay close to fp32, and the real vLLM backend draws
rollouts whose weights follow the policy (tests/test_precision.py checks bf16 log-probs on the
GPU too). Skipped without CUDA (CI has none); the vLLM tests
also need ``pip install vllm``. See docs/performance.md for the commands."""

import importlib.util
import json

import pytest
import torch

from tether.config import load_recipe
from tether.engine.loop import train
from tether.models.loading import build_model, char_tokenizer, load_model_and_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vllm (pip install vllm)"
)
CUDA = torch.device("cuda")

COMMON = ["train.log_every=1", "train.eval_every=3", "optim.warmup_steps=0", "eval.n=8"]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.max_positions=128"]
MOMENTS = "dpg.moments={'contains:1': 0.6, 'length': 2.0}"

# every stage and the branches that build tensors of their own (CTRL's cache, DPG's exact
# space, λ and log Z, the value head, the reward head)
STAGES = {
    "mle": ["task.name=addition", "task.max_digits=2", "eval.digits=[1,2]", *TINY],
    "iqlearn-online": [
        "task.name=multistep",
        "task.max_digits=2",
        "train.stage=iqlearn",
        "imitation.online_fraction=0.5",
        *TINY,
    ],
    "rl-ppo": ["INIT", "task.name=first-digit", "train.stage=rl", "rl.algorithm=ppo"],
    "rl-ctrl": [
        "INIT",
        "task.name=first-digit",
        "train.stage=rl",
        "rl.algorithm=rloo",
        "rl.group_size=2",
        "rl.prompts_per_step=4",
        "reward.kind=graded",
        "reward.calibrate=true",
        "reward.reference_samples=4",
        "reward.transform=exp",
    ],
    "rl-prioritized": [
        "INIT",
        "task.name=addition",
        "train.stage=rl",
        "rl.certainty_exponent=1",
        "rl.prompts_per_step=8",
        "eval.digits=[1]",
    ],
    "online-dpo": ["INIT", "task.name=first-digit", "train.stage=online-dpo", "train.batch_size=8"],
    "xpo": ["INIT", "task.name=first-digit", "train.stage=xpo", "train.batch_size=8"],
    "dpg-exact": [
        "INIT",
        "task.name=enumerable",
        "train.stage=dpg",
        "dpg.log_z=exact",
        "dpg.proposal=adaptive",
    ],
    "dpg-moments": [
        "INIT",
        "task.name=enumerable",
        "train.stage=dpg",
        "dpg.target=moments",
        MOMENTS,
        "dpg.moment_samples=2048",
    ],
    "dpo": [
        "INIT",
        "task.name=multistep-prefs",
        "task.max_digits=1",
        "train.stage=dpo",
        "train.batch_size=8",
    ],
    "reward-model": [
        "task.name=multistep-prefs",
        "task.max_digits=1",
        "train.stage=reward-model",
        "train.batch_size=8",
        *TINY,
    ],
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_trains_on_the_gpu(name, precision, tiny_checkpoint, tmp_path):
    overrides = [f"model.init={tiny_checkpoint}" if o == "INIT" else o for o in STAGES[name]]
    recipe = load_recipe(
        None, [*overrides, *COMMON, "train.steps=3", f"train.precision={precision}"]
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(abs(v) < 1e6 for v in losses), losses
    assert summary["steps"] == 3


# ---------------------------------------------------------------- the real vLLM


@pytest.fixture(scope="module")
def vllm_checkpoint(tmp_path_factory):
    """A small Llama with a head size every vLLM attention kernel takes (64), its matrices
    scaled up so the next-token distributions are peaked: greedy decoding then has no near
    ties that bf16 rounding could flip."""
    path = tmp_path_factory.mktemp("vllm-policy")
    torch.manual_seed(0)
    tok = char_tokenizer(model_max_length=256)
    model = build_model(tok, arch="llama", n_layer=2, n_head=2, n_embd=128, max_positions=256)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_collectives_under_nccl_take_cpu_and_cuda_tensors():
    """A one-process NCCL group (accelerate's backend on GPUs): the loop's CPU counts and the
    losses' CUDA counts both sum, and come back on the device they came from."""
    import socket

    import torch.distributed as dist

    from tether import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        on_cpu = distributed._summed(torch.tensor(3))
        on_gpu = distributed._summed(torch.tensor([1.5, 2.0], device=CUDA))
        assert on_cpu.device.type == "cpu" and int(on_cpu) == 3
        assert on_gpu.device.type == "cuda" and on_gpu.tolist() == [1.5, 2.0]
    finally:
        dist.destroy_process_group()


@needs_vllm
def test_vllm_rollouts_follow_the_policy_weights(vllm_checkpoint):
    """Greedy vLLM completions equal the hf sampler's for the weights last synced, and change
    when the policy's weights do."""
    from tether.generation.rollouts import HFRolloutBackend
    from tether.generation.vllm import VLLMRolloutBackend

    recipe = load_recipe(
        None,
        [
            f"model.init={vllm_checkpoint}",
            "train.stage=rl",
            "train.sampler=vllm",
            "train.precision=bf16",
        ],
    )
    policy, tok = load_model_and_tokenizer(str(vllm_checkpoint), device=CUDA)
    rollouts = VLLMRolloutBackend(recipe, policy, tok, CUDA)
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(8)]
    kw = {"max_new_tokens": 8, "temperature": 0.0, "generator": None}

    def agreement():
        ours = rollouts(policy, prompts, **kw)
        theirs = HFRolloutBackend(tok)(policy, prompts, **kw)
        same = [a == b for a, b in zip(ours.texts, theirs.texts, strict=True)]
        return sum(same) / len(same), ours

    before, out = agreement()
    assert before > 0.8  # bf16 vLLM vs fp32 hf: rare near-ties may differ
    assert out.logprobs.dtype == torch.float32 and out.logprobs.device.type == "cuda"
    first = out.texts
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after, out = agreement()
    assert after > 0.8
    assert sum(a != b for a, b in zip(first, out.texts, strict=True)) > len(prompts) // 2


@needs_vllm
def test_rl_trains_on_vllm_rollouts(vllm_checkpoint, tmp_path):
    recipe = load_recipe(
        None,
        [
            f"model.init={vllm_checkpoint}",
            "task.name=first-digit",
            "train.stage=rl",
            "train.sampler=vllm",
            "train.precision=bf16",
            "rl.algorithm=ppo",
            "rl.prompts_per_step=32",
            "train.steps=5",
            *COMMON,
        ],
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    assert summary["steps"] == 5 and summary["eval/acc_rl"] >= 0.0
