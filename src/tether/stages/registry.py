"""The stage registry: one row per ``train.stage``, the one place that lists the stages.

Each row names the stage's class and records the properties the rest of tether asks about
(the recipe checks, the rollout backend, the loop's evaluation at step 0, the evaluation
figures), so no other module keeps a list of stage names. Adding a stage is one module under
``tether.stages`` (a :class:`tether.stages.base.Stage` subclass) plus one row here.

The table is data and imports nothing from tether: :mod:`tether.config` validates
``train.stage`` against it, and :func:`tether.stages.base.make_stage` imports the row's class by
its path only when a run builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

# When a property holds for a stage: always, never, or only under one setting of its recipe
#   "online": imitation.online_fraction > 0 (online IQLearn);  "ppo": rl.algorithm ppo or grpo
When = Literal["always", "never", "online", "ppo"]


@dataclass(frozen=True)
class StageSpec:
    """What tether knows about one ``train.stage``."""

    stage_class: str  # "module:Class", imported by make_stage
    summary: str  # one line: what the stage trains, for listings and docs
    needs_reference: bool = False  # model.init is required: it is the frozen reference π_ref
    samples_from_policy: When = "never"  # draws from the policy while it trains (train.sampler)
    reads_sampler_logprobs: When = "never"  # uses the sampler's log-probs (PPO's old, DPG's q)
    scores_with_reward: bool = False  # judges its samples with the recipe's reward section
    # the reward that reward.kind checker (the section's default) means for this stage
    default_reward: Literal["checker", "graded"] = "checker"
    calibrates_reward: bool = False  # reward.calibrate (CTRL) applies
    needs_preference_task: bool = False  # trains on preference pairs (a preference task)
    refuses_preference_task: bool = False  # needs a task's reward, which pairs do not give
    evaluates_at_start: bool = False  # the loop logs the evaluation figures at step 0
    evaluates_rl_distribution: bool = False  # addition: accuracy on the RL distribution too


STAGES: dict[str, StageSpec] = {
    "mle": StageSpec(
        "tether.stages.imitation:ImitationStage",
        "maximum likelihood on the task's demonstrations (optionally entropy or label smoothing)",
    ),
    "iqlearn": StageSpec(
        "tether.stages.imitation:ImitationStage",
        "IQLearn, TD-regularised MLE on demonstrations; online with imitation.online_fraction",
        samples_from_policy="online",
    ),
    "rl": StageSpec(
        "tether.stages.rl:RLStage",
        "KL-regularised RL (REINFORCE, RLOO, A2C, PPO) against the frozen model.init",
        needs_reference=True,
        samples_from_policy="always",
        reads_sampler_logprobs="ppo",
        scores_with_reward=True,
        calibrates_reward=True,
        evaluates_at_start=True,
        evaluates_rl_distribution=True,
    ),
    "dpo": StageSpec(
        "tether.stages.preference:DPOStage",
        "DPO or IPO on preference pairs against the frozen model.init",
        needs_reference=True,
        needs_preference_task=True,
    ),
    "online-dpo": StageSpec(
        "tether.stages.online_preference:OnlinePreferenceStage",
        "online DPO: pairs sampled from the policy and labelled by the reward",
        needs_reference=True,
        samples_from_policy="always",
        scores_with_reward=True,
        evaluates_at_start=True,
        evaluates_rl_distribution=True,
    ),
    "xpo": StageSpec(
        "tether.stages.online_preference:OnlinePreferenceStage",
        "XPO: online DPO plus the exploration bonus α·log π(ỹ), ỹ ∼ π_ref",
        needs_reference=True,
        samples_from_policy="always",
        scores_with_reward=True,
        evaluates_at_start=True,
        evaluates_rl_distribution=True,
    ),
    "reward-model": StageSpec(
        "tether.stages.preference:RewardModelStage",
        "a Bradley-Terry reward model (a scalar head) on preference pairs",
        needs_preference_task=True,
    ),
    "dpg": StageSpec(
        "tether.stages.dpg:DPGStage",
        "DPG / f-DPG: distribution matching toward π_ref·exp(r/β) or a constraint",
        needs_reference=True,
        samples_from_policy="always",
        reads_sampler_logprobs="always",
        scores_with_reward=True,
        default_reward="graded",  # r of the target: the task's graded score unless set
        refuses_preference_task=True,
        evaluates_at_start=True,
    ),
}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)

# train.stage's type: the table's names (pydantic's error then lists them on one line)
if TYPE_CHECKING:
    StageName = str
else:
    StageName = Literal[STAGE_NAMES]
