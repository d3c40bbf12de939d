"""The stage registry: which class trains each ``train.stage``."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.config import Recipe
from tether.stages.base import Stage
from tether.stages.imitation import ImitationStage


def make_stage(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, device: torch.device
) -> Stage:
    if recipe.train.stage in ("mle", "iqlearn"):
        return ImitationStage(recipe, tokenizer, model, device)
    if recipe.train.stage == "rl":
        from tether.stages.rl import RLStage

        return RLStage(recipe, tokenizer, model, device)
    if recipe.train.stage == "dpo":
        from tether.stages.preference import DPOStage

        return DPOStage(recipe, tokenizer, model, device)
    if recipe.train.stage in ("online-dpo", "xpo"):
        from tether.stages.online_preference import OnlinePreferenceStage

        return OnlinePreferenceStage(recipe, tokenizer, model, device)
    if recipe.train.stage == "dpg":
        from tether.stages.dpg import DPGStage

        return DPGStage(recipe, tokenizer, model, device)
    if recipe.train.stage == "reward-model":
        from tether.stages.preference import RewardModelStage

        return RewardModelStage(recipe, tokenizer, model, device)
    raise ValueError(f"train.stage: unknown stage {recipe.train.stage!r}")
