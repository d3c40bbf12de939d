"""A whole recipe: its sections, and the rules that span them (what the stage's registry row asks)."""

from __future__ import annotations

from pydantic import Field, model_validator

from tether.config.sections import (
    DPGConfig,
    EvalConfig,
    ImitationConfig,
    ModelConfig,
    OptimConfig,
    PreferenceConfig,
    RewardConfig,
    RLConfig,
    Strict,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from tether.stages.registry import STAGES, When
from tether.tasks import PREFERENCE_TASK_NAMES


class Recipe(Strict):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    imitation: ImitationConfig = Field(default_factory=ImitationConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    dpg: DPGConfig = Field(default_factory=DPGConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _fits_the_stage(self) -> Recipe:  # what the stage's registry row asks of the recipe
        stage = STAGES[self.train.stage]
        if stage.needs_reference and self.model.init is None:
            raise ValueError(
                f"model.init is required when train.stage is {self.train.stage} "
                "(it is the reference)"
            )
        preference_task = self.task.name in PREFERENCE_TASK_NAMES
        if stage.needs_preference_task and not preference_task:
            raise ValueError(
                f"train.stage {self.train.stage} needs preference pairs: task.name "
                f"{', '.join(PREFERENCE_TASK_NAMES)} (got {self.task.name})"
            )
        if self.reward.calibrate and not stage.calibrates_reward:
            only = " ".join(n for n, s in STAGES.items() if s.calibrates_reward)
            raise ValueError(
                f"reward.calibrate (CTRL) applies to train.stage {only} only; online preference "
                f"pairs are labelled by the raw reward (got train.stage {self.train.stage})"
            )
        if stage.refuses_preference_task and preference_task:
            raise ValueError(
                f"train.stage {self.train.stage} samples and scores responses: task.name "
                f"{self.task.name} holds preference pairs, not a reward"
            )
        if self.task.name == "jsonl" and self.task.completion_field is None:
            if stage.samples_from_policy != "always":
                raise ValueError(
                    f"train.stage {self.train.stage} learns from demonstrations: "
                    "task.completion_field null (prompt-only rows) gives none; name the "
                    "completion column, or use a stage that samples (rl, online-dpo, xpo, dpg)"
                )
            if self.reward.kind in ("checker", "graded", None):
                raise ValueError(
                    f"reward.kind {self.reward.kind or stage.default_reward}: prompt-only rows "
                    "(task.completion_field null) hold no reference to check against; use "
                    "reward.kind python (reward.function may read the row's columns) or model"
                )
        if self.dpg.log_z == "exact" and self.task.name != "enumerable":
            raise ValueError(
                f"dpg.log_z exact needs task.name enumerable (got {self.task.name}): "
                "use running or batch"
            )
        if self.train.sampler == "vllm" and not self.samples_from_policy:
            always = ", ".join(n for n, s in STAGES.items() if s.samples_from_policy == "always")
            online = " and ".join(n for n, s in STAGES.items() if s.samples_from_policy == "online")
            raise ValueError(
                f"train.sampler vllm: train.stage {self.train.stage} draws no samples from the "
                f"policy (vllm serves {always} and {online} with imitation.online_fraction > 0); "
                "use train.sampler hf"
            )
        if self.imitation.label_smoothing and self.train.stage != "mle":
            raise ValueError(
                "imitation.label_smoothing applies to train.stage mle only "
                f"(got train.stage {self.train.stage})"
            )
        if self.imitation.label_smoothing and self.imitation.entropy_coef:
            raise ValueError(
                "imitation.label_smoothing and imitation.entropy_coef: set one of the two "
                "(both spread the clone's mass)"
            )
        return self

    def holds(self, when: When) -> bool:
        """Whether a registry property that holds ``when`` holds for this recipe."""
        online = when == "online" and self.imitation.online_fraction > 0
        # "ppo": the algorithms with a ratio to the sampling policy (PPO, GRPO), where the policy
        # changes between the collect and an update (one update: the loss's own, detached)
        clipped = (
            when == "ppo"
            and self.rl.algorithm in ("ppo", "grpo")
            and self.rl.updates_per_collect > 1
        )
        return when == "always" or online or clipped

    @property
    def samples_from_policy(self) -> bool:
        """The stage samples from the policy while it trains (rollouts, online pairs, online
        IQLearn's policy rows), so it needs the policy's whole weights at hand."""
        return self.holds(STAGES[self.train.stage].samples_from_policy)

    @property
    def reads_sampler_logprobs(self) -> bool:
        """The stage reads the sampler's log-probs (PPO's old log-probs, DPG's log q)."""
        return self.holds(STAGES[self.train.stage].reads_sampler_logprobs)
