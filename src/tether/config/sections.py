"""The recipe's sections, one pydantic model each: every key typed, range-checked and described."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tether.stages.registry import StageName
from tether.tasks import TASK_NAMES
from tether.tasks.prompts import ChatTemplate

# task.name's type: the names of tether.tasks.TASKS (pydantic's error lists them on one line)
if TYPE_CHECKING:
    TaskName = str
else:
    TaskName = Literal[TASK_NAMES]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Strict):
    name: TaskName = "addition"
    chat_template: ChatTemplate = Field(
        "auto",
        description="auto: prompts go through the tokenizer's chat template when it has one; "
        "on: always (an error without one); off: never (tether.tasks.prompts)",
    )
    system_prompt: str | None = Field(
        None,
        description="a system turn before each prompt (with the chat template), or a first "
        "paragraph (without); null keeps the template's own default, if any",
    )

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    max_digits: int = Field(
        3,
        ge=1,
        le=18,
        description="addition: N (pre-training covers 1..N digits); multistep, multistep-prefs: "
        "the longest operand; word-problems, word-problems-prefs: the longest operand and answer "
        "(1 is their setting); enumerable: the longest answer (341 responses at 3, at most 7)",
    )
    long_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of pre-training problems drawn from the N+1 RL distribution",
    )
    train_size: int | None = Field(
        None, ge=1, description="a fixed training set of this many problems (small-data runs)"
    )
    path: str | None = Field(
        None, description="jsonl: the prompt/completion file; prefs-jsonl: the preference file"
    )
    prompt_field: str = Field("prompt", min_length=1)
    completion_field: str | None = Field(
        "completion",
        min_length=1,
        description="jsonl: the demonstration column; null = prompt-only rows (for the stages "
        "that sample: rl, online-dpo, xpo, dpg), whose other columns reach the reward, which "
        "must then be reward.kind python or model (no reference to check against)",
    )
    chosen_field: str = Field("chosen", min_length=1, description="prefs-jsonl")
    rejected_field: str = Field("rejected", min_length=1, description="prefs-jsonl")
    max_chars: int | None = Field(
        None, ge=1, description="jsonl, prefs-jsonl: skip longer rows (counted)"
    )
    strict: bool = Field(
        False, description="jsonl, prefs-jsonl: any bad row is an error, not a counted skip"
    )
    demonstrations: Literal["uniform", "expert"] = Field(
        "uniform",
        description="enumerable: who writes the MLE answers: uniform random strings, or a good "
        "but imperfect expert (best answers with probability expert_share, else uniform ones; "
        "docs/methods.md §6)",
    )
    expert_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="demonstrations expert: the expert's share of best answers (null = 0.9)",
    )

    @model_validator(mode="after")
    def _files_need_a_path(self) -> TaskConfig:
        if self.name in ("jsonl", "prefs-jsonl") and not self.path:
            raise ValueError(
                f"task.path is required when task.name is {self.name} (a JSON Lines file)"
            )
        if self.completion_field is None and self.name != "jsonl":
            raise ValueError(
                f"task.completion_field: null (prompt-only rows) is for task.name jsonl only "
                f"(got {self.name})"
            )
        if self.name == "jsonl" and self.prompt_field == self.completion_field:
            raise ValueError(
                "task.prompt_field and task.completion_field must be two different names"
            )
        fields = (self.prompt_field, self.chosen_field, self.rejected_field)
        if self.name == "prefs-jsonl" and len(set(fields)) != 3:
            raise ValueError(
                "task.prompt_field, chosen_field and rejected_field must be three different names"
            )
        if self.name == "enumerable":
            from tether.tasks.enumerable import check_space

            check_space(self.max_digits)
        elif self.demonstrations != "uniform":
            raise ValueError(
                f"task.demonstrations {self.demonstrations} needs task.name enumerable "
                f"(got {self.name})"
            )
        if self.expert_share is not None and self.demonstrations != "expert":
            raise ValueError(
                "task.expert_share applies to task.demonstrations expert only "
                f"(got {self.demonstrations})"
            )
        return self


class LoraConfig(Strict):
    """Low-rank adapters (LoRA, via ``peft``) on ``model.init``: only the adapters train, and
    the reference of a KL-tethered stage is the same model with its adapters switched off."""

    r: int = Field(8, ge=1, le=4096, description="the adapters' rank")
    alpha: float = Field(16.0, gt=0.0, description="scale: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | None = Field(
        None,
        description="module names (or name endings, e.g. q_proj, attn.c_attn) that get "
        "adapters; null = every linear layer of the transformer blocks (not the LM head)",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if not names:
            raise ValueError("give at least one module name, or null for every linear layer")
        if any(not n.strip() for n in names):
            raise ValueError("module names must be non-empty")
        if len(set(names)) != len(names):
            raise ValueError("module names must not repeat")
        return names


class ModelConfig(Strict):
    init: str | None = Field(None, description="shipped model name or checkpoint path; none = new")
    arch: Literal["gpt2", "llama"] = "llama"
    n_layer: int = Field(4, ge=1, le=64)
    n_head: int = Field(4, ge=1, le=64)
    n_embd: int = Field(128, ge=8, le=8192)
    max_positions: int = Field(1024, ge=16, le=65536)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora: LoraConfig | None = Field(
        None, description="train low-rank adapters on model.init instead of every weight"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        head = self.n_embd // self.n_head
        if self.arch == "llama" and head % 2:
            raise ValueError(
                f"n_embd / n_head (the head size, {head}) must be even for arch llama "
                "(rotary position embeddings turn pairs of dimensions)"
            )
        if self.lora is not None and self.init is None:
            raise ValueError(
                "model.lora needs model.init: adapters are trained on a checkpoint "
                "(set model.init, or model.lora: null to train a new model)"
            )
        return self


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / peak lr (cosine)")
    grad_clip: float | None = Field(1.0, gt=0.0)


class TrainConfig(Strict):
    stage: StageName = "mle"  # a row of tether.stages.registry.STAGES
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1, le=65536)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_at_start: bool = Field(
        True,
        description="evaluate the starting model before step 1 (the stages that do: rl, "
        "online-dpo, xpo, dpg...); false skips it, e.g. when another run from the same model "
        "on the same problems already has it (tether demo's second arm)",
    )
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int | None = Field(
        3, ge=1, description="keep the newest K checkpoints/step-N folders; null keeps all"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip "
        "the batch and count it",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: the forward passes in the losses (policy and reference scoring) run "
        "under torch.autocast(bfloat16) and the rollouts are sampled with bf16 matmuls; "
        "log-probs, KL and losses stay fp32, and so do the weights and the optimizer state "
        "(tether.engine.precision; fast on GPUs and CPUs with bf16 units)",
    )
    sampler: Literal["hf", "vllm"] = Field(
        "hf",
        description="who draws the policy's rollouts (rl, online-dpo, xpo, dpg, online "
        "iqlearn): hf, the built-in KV-cache sampler, or vllm, a vllm.LLM whose weights follow "
        "the policy; log-probs are recomputed by the policy either way (tether.generation.vllm)",
    )
    vllm_gpu_memory: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="sampler vllm: the share of GPU memory vLLM takes (weights and KV cache); "
        "the rest is left to training",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _known_precision(cls, value: Any) -> Any:
        if value not in ("fp32", "bf16"):
            raise ValueError(
                "must be fp32 or bf16 (bf16: forward passes under autocast, log-probs and "
                "losses in fp32; fp16 is not supported, it would need loss scaling)"
            )
        return value

    compile: bool = Field(
        False,
        description="torch.compile the policy and the frozen reference (dynamic shapes): "
        "steps 0-16% faster on 2 CPU cores (docs/performance.md) after 20-30 s of compiling "
        "(a C++ compiler is needed); for long runs",
    )
    fused_ops: bool = Field(
        True,
        description="Llama models: RoPE and RMSNorm as fused ops (the same maths in fewer "
        "passes over the activations, tether.models.fused; steps up to 7% faster on the demo "
        "model); false keeps Hugging Face's ops; not used with compile, which fuses them itself",
    )
    onednn_linear: Literal["auto"] | bool = Field(
        False,
        description="fp32 on the CPU: linear layers through oneDNN's product instead of "
        "torch's (MKL's), forward and backward (tether.models.onednn_linear): 2.0-2.3x the "
        "matmul rate on an AMD EPYC, where MKL runs its AVX2 code; but memory grows with "
        "every new batch shape (oneDNN keeps kernels per shape and fragments the heap: a "
        "150-step run of the demo model with random lengths grew 1.3 GB, MKL's stayed flat), "
        "so off by default; true: on; auto: on CPUs with AVX-512 not made by Intel; not used "
        "with bf16, which goes through oneDNN already, nor with compile",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="rows per forward/backward pass: the batch is split into micro-batches "
        "whose gradients accumulate into one optimizer step (the same step as the whole batch; "
        "DDP synchronises on the last); rows the loss reads together stay together (an RLOO or "
        "DPG prompt group, a pair's two rows), so a micro-batch holds at least one such unit; "
        "null = the whole batch in one pass",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute the policy's activations in the backward pass instead of "
        "keeping them (less memory, about a third more compute; the same gradients; Hugging "
        "Face models that support gradient checkpointing, LoRA included)",
    )


class RLConfig(Strict):
    """KL-regularised RL on the task's RL distribution (docs/methods.md §2–3).

    The reference is the frozen initial policy (``model.init``). Rewards are terminal:
    ``reward_correct`` / ``reward_wrong``. ``certainty_exponent`` switches the standard KL
    (null: every token weighs 1) to the prioritised KL w = Ĵ(ref)^certainty_exponent.
    """

    algorithm: Literal["reinforce", "rloo", "a2c", "ppo", "grpo"] = "a2c"
    prompts_per_step: int = Field(50, ge=1, description="episodes per collect")
    group_size: int = Field(
        1, ge=1, description="samples per prompt (RLOO and GRPO need >= 2: TRL's num_generations)"
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="policy and reference sampled/scored at T (the paper's 2.0 suits its "
        "character model; on a 49k-token vocabulary T = 2 samples near-uniform noise)",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="default: longest scratchpad + margin"
    )
    reward_correct: float = 1.0
    reward_wrong: float = -1.0
    kl_coef: float = Field(5.0, ge=0.0, description="α, the KL coefficient")
    kl_estimator: Literal["k1", "k2", "k3", "exact"] = "k2"
    kl_placement: Literal["loss", "reward"] = "loss"
    certainty_exponent: float | None = Field(
        None,
        ge=0.0,
        description="β_c of the prioritised KL w = Ĵ^β_c, Ĵ = 1 − u/S (u: the reference's "
        "entropy or min-entropy at the token); null = the standard KL",
    )
    certainty_form: Literal["entropy", "max_prob"] = Field(
        "entropy", description="u: entropy (the paper) or −log max-probability (its code)"
    )
    certainty_temperature: float | None = Field(
        None, gt=0.0, description="softmax temperature of u (null: 1 for entropy, 4 for max_prob)"
    )
    certainty_normalization: Literal["typical", "vocabulary"] = Field(
        "typical",
        description="S: typical = 343·ū, ū the reference's mean u over the batch's completion "
        "tokens, so β_c means the same on any model and vocabulary (on the shipped 99-token "
        "model S ≈ log 99); vocabulary = log V, the paper's (on a 49k-token model at T = 1 "
        "it sets almost every weight near 0); docs/rl.md",
    )
    certainty_support: Literal["vocabulary", "task"] = Field(
        "vocabulary",
        description="the tokens u is computed over: the whole vocabulary, or the characters "
        "the task writes (task.alphabet, with EOS; the others' logits set to −inf before the "
        "softmax, and log V taken over the support), as the released code's arithmetic mode "
        "does; task needs a character tokenizer",
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    value_coef: float = Field(0.1, ge=0.0)
    entropy_coef: float = Field(0.001, ge=0.0)
    ppo_epochs: int | None = Field(
        None,
        ge=1,
        description="ppo, grpo: optimizer passes over each collect (GRPO: TRL's "
        "num_iterations, μ), the ratio taken against the sampling policy; null = 4 for ppo, "
        "1 for grpo (TRL's default)",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="grpo: A = (r − mean of the prompt's group) / (std + 1e-4) with the group's "
        "std (group, GRPO), the whole batch's (batch), or no division (none: Dr. GRPO); TRL's "
        "scale_rewards",
    )
    grpo_loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo",
        description="grpo: how the per-token losses are reduced (TRL's loss_type): grpo = each "
        "completion's token mean, then the mean over completions; dr_grpo = the sum over "
        "tokens / (completions × max_new_tokens); dapo = the mean over the batch's tokens "
        "(TRL 1.16's default)",
    )
    minibatches: int = Field(
        1,
        ge=1,
        description="optimizer steps per collect (per epoch for ppo): the rollout's rows "
        "(rloo: prompt groups) are shuffled and split into this many minibatches, each one "
        "step on its own token mean, as the released critical-token code updates on "
        "minibatches of token transitions; 1 = one step on the whole rollout",
    )
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    prompt_pool: int | None = Field(
        None,
        ge=1,
        description="draw RL prompts from a fixed set of this many (seeded); null = fresh "
        "prompts every step. With reward.calibrate each pooled prompt costs K reference "
        "samples once",
    )

    @property
    def epochs(self) -> int:
        """Optimizer passes over each collect: ``ppo_epochs`` (null: 4 for ppo, 1 for grpo);
        one for the algorithms without a ratio to the sampling policy."""
        if self.algorithm not in ("ppo", "grpo"):
            return 1
        return self.ppo_epochs or (4 if self.algorithm == "ppo" else 1)

    @property
    def updates_per_collect(self) -> int:
        """Optimizer steps taken on each collect (epochs × minibatches). With one, the policy
        that sampled is the policy being updated: PPO's and GRPO's ratio is taken against the
        loss's own log-probs, detached (TRL with num_iterations 1), not the sampler's."""
        return self.epochs * self.minibatches

    @model_validator(mode="after")
    def _rloo_needs_a_group(self) -> RLConfig:
        if self.algorithm in ("rloo", "grpo") and self.group_size < 2:
            raise ValueError(
                f"algorithm {self.algorithm} needs group_size >= 2 (samples per prompt)"
            )
        if self.algorithm == "grpo" and self.kl_placement != "loss":
            raise ValueError(
                "algorithm grpo puts the KL in its per-token loss, as TRL's GRPOTrainer: use "
                "kl_placement loss (kl_estimator k3 is TRL's)"
            )
        return self

    @model_validator(mode="after")
    def _kl_where_its_gradient_is_right(self) -> RLConfig:
        # a detached shaped reward's gradient E[∇log π·Σ_t KL_t] is the sequence KL's for
        # k1 = log π/π_ref only; in the loss, k1's expected gradient is E_π[∇log π] = 0
        if self.kl_placement == "reward" and self.kl_estimator != "k1":
            raise ValueError(
                f"kl_placement reward needs kl_estimator k1 (got {self.kl_estimator}): the shaped "
                "reward is detached, so only k1 gives the sequence-KL penalty (use the loss)"
            )
        if self.kl_placement == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "kl_estimator k1 in the loss has zero expected gradient (E_π[∇ log π] = 0): "
                "use k2, k3 or exact there, or k1 with kl_placement reward"
            )
        return self


class ImitationConfig(Strict):
    """Learning from demonstrations (docs/methods.md §4): ``train.stage: mle`` (with an optional
    entropy bonus) or ``train.stage: iqlearn``, offline or online."""

    entropy_coef: float = Field(0.0, ge=0.0, description="mle: the MLE + entropy-bonus baseline")
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="mle: ε, cross-entropy against (1−ε)·onehot + ε·uniform, so every token keeps "
        "a floor of probability (demonstration-regularised RL's behaviour cloning)",
    )
    lam: float = Field(0.1, ge=0.0, description="iqlearn: λ, weight of the TD term r̂²")
    lam_warmup_steps: int = Field(0, ge=0, description="iqlearn: λ rises linearly from 0")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="iqlearn: discount of r̂ = Q − γV′")
    online_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="iqlearn: α_mix, share of each batch sampled from the policy (0 = offline)",
    )
    online_temperature: float = Field(1.0, gt=0.0, description="iqlearn: policy sampling T")


class PreferenceConfig(Strict):
    """Preference learning (docs/methods.md §7). Offline, on a preference task (``multistep-prefs``
    or ``prefs-jsonl``): ``train.stage: dpo`` (DPO with ``loss: sigmoid``, IPO with
    ``loss: ipo``; the reference is the frozen ``model.init``) and ``train.stage:
    reward-model`` (a Bradley–Terry scalar head, which uses none of these keys). Online, on
    any task with a reward (the ``reward`` section labels the pairs): ``train.stage:
    online-dpo`` and ``train.stage: xpo`` (online DPO plus α·log π(ỹ), ỹ ∼ π_ref)."""

    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: DPO or IPO")
    beta: float = Field(0.1, gt=0.0, description="β: the KL strength (IPO's τ)")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="sigmoid: conservative DPO's ε (label flip rate)"
    )
    length_normalize: bool = Field(
        False, description="log-ratios averaged over response tokens instead of summed"
    )
    alpha: float = Field(
        1e-3, ge=0.0, description="xpo: α, weight of the exploration bonus α·log π_θ(ỹ|x)"
    )
    pair_with: Literal["reference", "policy"] = Field(
        "reference",
        description="online-dpo: the second response of each pair, ỹ ∼ π_ref (as XPO) or a "
        "second policy sample; xpo always uses the reference",
    )
    ties: Literal["policy", "drop"] = Field(
        "policy",
        description="online pairs with equal rewards: the policy sample is chosen (XPO) or "
        "the pair is left out of the loss",
    )
    temperature: float = Field(1.0, gt=0.0, description="online: sampling temperature")
    max_new_tokens: int | None = Field(None, ge=1, description="online: default from the task")

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> PreferenceConfig:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss sigmoid only, not ipo")
        return self


class RewardConfig(Strict):
    """The reward of sampled completions (``tether.rewards.functions``), for ``rl``,
    ``online-dpo``, ``xpo`` and ``tether winrate``; optionally calibrated and transformed as
    in InfAlign's CTRL (docs/methods.md §8)."""

    kind: Literal["checker", "graded", "python", "model"] | None = Field(
        None,
        description="checker: rl.reward_correct/reward_wrong; graded: the task's score in "
        "[0, 1]; python: reward.function; model: a reward-model checkpoint; null: the stage's "
        "default (checker; dpg: graded, the target's r)",
    )
    function: str | None = Field(
        None, description="python: 'package.module:name' or 'file.py:name', (prompt, completion)"
    )
    model: str | None = Field(None, description="model: a train.stage reward-model checkpoint")
    calibrate: bool = Field(
        False, description="CTRL: the reward becomes its mid-rank among K reference samples"
    )
    reference_samples: int = Field(16, ge=1, le=4096, description="K, per prompt, cached")
    transform: Literal["identity", "log", "exp", "neg_exp"] = Field(
        "identity",
        description="Φ(C): identity, log (best-of-N with kl_coef 1/(N−1)), exp(t·C) "
        "(best-of-N), −exp(−t·C) (worst-of-N)",
    )
    t: float | Literal["optimise"] | None = Field(
        None,
        description="exp, neg_exp: t > 0; null = 2N − 1; optimise = the t that maximises the "
        "best/worst-of-N win rate near π_ref in the calibrated model",
    )
    n: int = Field(4, ge=1, description="N of the decoding aimed at (for the default t)")

    @model_validator(mode="after")
    def _needs(self) -> RewardConfig:
        if self.kind == "python" and not self.function:
            raise ValueError("reward.function is required when reward.kind is python")
        if self.kind == "model" and not self.model:
            raise ValueError("reward.model is required when reward.kind is model")
        if isinstance(self.t, float) and not self.t > 0:
            raise ValueError(f"reward.t must be > 0 or optimise, got {self.t}")
        if self.transform != "identity" and not self.calibrate:
            raise ValueError(
                f"reward.transform {self.transform} acts on calibrated rewards: "
                "set reward.calibrate: true"
            )
        return self


class DPGConfig(Strict):
    """Distribution matching toward the target EBM P = π_ref·exp(r/β) (docs/methods.md §5), with
    ``train.stage: dpg``. The reference π_ref is the frozen ``model.init``; r is the task's
    graded score in [0, 1]. ``divergence`` picks the gradient: ``forward_kl`` is DPG (KL(p‖π),
    mass-covering), ``reverse_kl`` is KL(π‖p), which *is* KL-RL with kl_coef β, ``js`` and ``tv``
    are f-DPG's bounded alternatives (JS is its recommended default)."""

    divergence: Literal["forward_kl", "reverse_kl", "js", "tv"] = Field(
        "forward_kl", description="forward_kl = DPG; reverse_kl = KL-RL; js, tv = f-DPG"
    )
    target: Literal["reward", "constraint", "moments"] = Field(
        "reward",
        description="reward: P = π_ref·exp(r/β); constraint: P = π_ref·[task.is_correct] "
        "(π_ref conditioned on success, no β); moments: P = π_ref·exp(λ·φ) with the feature "
        "means of dpg.moments, λ fitted by SNIS on reference samples (no β)",
    )
    moments: dict[str, float] = Field(
        default_factory=dict,
        description="moments: feature name -> target mean, e.g. {'contains:1': 0.5, 'length': 2} "
        "(tether.tasks.features)",
    )
    moment_samples: int = Field(
        4096, ge=16, description="moments: reference samples for fitting λ (once, at the start)"
    )
    beta: float = Field(0.25, gt=0.0, description="β, the target's temperature (KL-RL's kl_coef)")
    prompts_per_step: int = Field(1, ge=1, description="prompts drawn per step")
    samples_per_step: int = Field(
        64, ge=2, description="responses per step, split evenly over the prompts"
    )
    proposal: Literal["policy", "adaptive"] = Field(
        "policy",
        description="policy: on-policy samples; adaptive: off-policy from a frozen copy of the "
        "policy, replaced when the policy is closer to the target (GDC++)",
    )
    baseline: bool = Field(
        True,
        description="forward_kl: the GDC++ baseline; others: the leave-one-out baseline",
    )
    log_z: Literal["running", "batch", "exact"] = Field(
        "running",
        description="log Z: mean P/q over every sample of the prompt so far (running), over "
        "this step's (batch), or enumerated (exact; task enumerable only)",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="sampling temperature; samples are importance-weighted to π"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DPGConfig:
        if self.samples_per_step % self.prompts_per_step:
            raise ValueError(
                f"samples_per_step ({self.samples_per_step}) must be a multiple of "
                f"prompts_per_step ({self.prompts_per_step})"
            )
        if self.samples_per_step // self.prompts_per_step < 2:
            raise ValueError("each prompt needs at least 2 samples per step (samples_per_step)")
        if self.target == "constraint" and self.divergence == "reverse_kl":
            raise ValueError(
                "divergence reverse_kl is infinite for a hard constraint (P = 0 where it fails): "
                "use forward_kl, js or tv"
            )
        if (self.target == "moments") != bool(self.moments):
            raise ValueError(
                "dpg.moments (feature -> target mean) is required with dpg.target moments, "
                "and only then"
            )
        if self.moments:
            from tether.tasks.features import FeatureError, feature_function

            for name in self.moments:
                try:
                    feature_function(name)
                except FeatureError as err:
                    raise ValueError(f"dpg.moments: {err}") from None
        return self


class EvalConfig(Strict):
    digits: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], description="[] = no table")
    n: int = Field(100, ge=1, description="problems per digit length and kind")
    temperature: float = Field(0.0, ge=0.0)
    batch_size: int = Field(256, ge=1)

    @field_validator("digits")
    @classmethod
    def _digits_in_range(cls, digits: list[int]) -> list[int]:
        if any(d < 1 or d > 18 for d in digits):
            raise ValueError("every digit length must lie in 1..18")
        return digits


class TrackingConfig(Strict):
    trackers: list[Literal["tensorboard", "trackio", "wandb"]] = Field(default_factory=list)
