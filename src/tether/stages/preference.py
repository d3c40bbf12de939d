"""Offline preference stages (docs/methods.md §7): DPO/IPO and a Bradley–Terry reward model.

Both read the same batches: B pairs (prompt x, chosen y_w, rejected y_l) drawn from a
preference task (``multistep-prefs`` or ``prefs-jsonl``) as 2B right-padded rows, the B chosen
responses first and then the B rejected ones of the same prompts (EOS appended to each
response, as in MLE). No sampling: the data are the pairs.

**DPO** (``train.stage: dpo``). With token log-probs of the trainable policy π_θ and of the
frozen reference π_ref (``model.init``, loaded a second time, like the RL stage's reference;
under ``model.lora`` the policy with its adapters off):

    h(x, y) = Σ_t m_t·(log π_θ(y_t|s_t) − log π_ref(y_t|s_t))      (÷ Σ_t m_t if length_normalize)
    sigmoid:  L = −(1 − ε)·log σ(β·(h_w − h_l)) − ε·log σ(−β·(h_w − h_l))
    ipo:      L = (h_w − h_l − 1/(2β))²

The two rows of a pair share their prompt, and on the addition task most of their responses
too: the log-probs of both models are taken with each pair packed into one row, the shared
prefix run once (:func:`tether.scoring.pair_token_logprobs`; the values of each row scored
alone, to float rounding). On the demo model's DPO batches that is a third fewer positions.

At step 0 the policy is the reference, so every h is 0 and the sigmoid loss is log 2.
Logged: the loss, the implicit-reward margin β·(h_w − h_l), the reward accuracy (share of pairs
with a positive margin), the mean implicit rewards, and the policy's mean sequence log-probs
of the chosen and rejected responses (DPO is known to lower both; watch ``chosen_logp``).

**Reward model** (``train.stage: reward-model``). A scalar head, ``nn.Linear(hidden, 1)``, on the
model's last hidden state at the last real token (the EOS that ends the response) gives a
score s(x, y); the head and the whole transformer are trained with the Bradley–Terry loss
−log σ(s_w − s_l). The head starts at zero, so the first loss is log 2 as well.

Where the head is saved, and why: the training loop saves the model it trains with
``save_pretrained``, and every checkpoint must stay loadable with
``AutoModelForCausalLM.from_pretrained``. So the reward model is the causal LM (its body is the
reward model's body; its LM head is simply unused) plus the scalar head in a file of its own,
``reward_head.safetensors`` (:data:`REWARD_HEAD_FILE`), written next to the weights in every
checkpoint folder: the loop calls the stage's ``save_extra`` on the temporary folder it then
renames into place, so the head is written atomically with the weights.
:func:`load_reward_model` loads the pair back. The alternative, an
``AutoModelForSequenceClassification``, would need the loop to build and save a different model
class and would not load as a causal LM. For ``--resume`` the head is also part of the stage's
``state_dict`` (as the RL value head is).
"""

from __future__ import annotations

import random
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import OfflinePairBatch, TokenBatch, collate_pairs
from tether.config import Recipe
from tether.models.loading import eval_mode
from tether.objectives import (
    bradley_terry_loss,
    preference_loss,
    sequence_logprobs,
    sequence_logratios,
    shifted_token_logprobs,
)
from tether.rewards.reward_model import last_token_scores, save_reward_head
from tether.scoring import pair_token_logprobs
from tether.stages.base import Stage, micro_parts


class _PairStream(Stage[OfflinePairBatch]):
    """Preference pairs from the recipe's task, drawn with the stage's own seeded RNG."""

    splits_batches = True

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        device: torch.device,
    ) -> None:
        super().__init__(recipe, tokenizer, model, device)
        self.batch_size = recipe.train.batch_size
        self.eval_n = recipe.eval.n
        self.eval_seed = recipe.seed

    def _collate(self, problems: list[Any]) -> TokenBatch:
        """The chosen rows, then the rejected rows of the same prompts."""
        prompts = [self.task.model_input(self.tokenizer, p) for p in problems]
        responses = [p.chosen for p in problems] + [p.rejected for p in problems]
        return collate_pairs(self.tokenizer, prompts + prompts, responses).to(self.device)

    def draw_pairs(self) -> TokenBatch:
        """The global batch's pairs, this process's share of them (tether.distributed)."""
        problems = [self.task.pretrain_problem(self.rng) for _ in range(self.batch_size)]
        return self._collate(distributed.shard(problems, "train.batch_size"))

    def eval_pairs(self) -> TokenBatch:
        """The same ``eval.n`` pairs at every evaluation (fresh problems for generated tasks
        and ``task.train_size`` pools; rows of the file itself for ``prefs-jsonl``)."""
        rng = random.Random(f"tether-eval-pairs/{self.eval_seed}")
        return self._collate([self.task.rl_problem(rng) for _ in range(self.eval_n)])

    def micro_batches(
        self, model: nn.Module, batch: OfflinePairBatch, size: int
    ) -> list[OfflinePairBatch]:
        """Micro-batches of whole pairs (both rows of each, 2 rows a pair); the losses are
        means over pairs, so a micro-batch's own mean, weighted by its share of the pairs,
        adds up to the batch's (:meth:`Stage.micro_batches`)."""
        parts = micro_parts(batch.pairs, 2, size, self.device)
        if len(parts) == 1:
            return [batch]
        return [batch.select(pairs, share) for pairs, share in parts]

    @abstractmethod
    def pair_scores(self, model: nn.Module, tokens: TokenBatch) -> Tensor:
        """A score per row whose chosen-minus-rejected difference ranks the pair."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Pairwise accuracy on the evaluation pairs: how often the chosen response scores
        above the rejected one (DPO: the implicit reward β·h; reward model: its score)."""
        with eval_mode(model):
            scores = self.pair_scores(model, self.eval_pairs())
        b = scores.shape[0] // 2
        margin = scores[:b] - scores[b:]
        return {
            "eval/pair_accuracy": float((margin > 0).float().mean()),
            "eval/pair_margin": float(margin.mean()),
        }


# ----------------------------------------------------------------------------- DPO / IPO


class DPOStage(_PairStream):
    """DPO or IPO against the frozen ``model.init`` (module docstring)."""

    reference: nn.Module  # the registry row: dpo needs one

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        policy: PreTrainedModel,
        device: torch.device,
    ) -> None:
        super().__init__(recipe, tokenizer, policy, device)
        self.cfg = recipe.preference

    @torch.no_grad()
    def next_batch(self) -> OfflinePairBatch:
        tokens = self.draw_pairs()
        ref_logp = pair_token_logprobs(
            self.reference, tokens.input_ids, tokens.attention_mask, tokens.loss_mask
        )  # once per batch; each pair's shared prefix run once (tether.scoring)
        return OfflinePairBatch(tokens, ref_logp)

    def pair_scores(self, model: nn.Module, tokens: TokenBatch) -> Tensor:
        """The implicit reward β·h(x, y) of every row."""
        ref = self.reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        pol = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        h = sequence_logratios(
            shifted_token_logprobs(pol.logits, tokens.input_ids),
            shifted_token_logprobs(ref.logits, tokens.input_ids),
            tokens.loss_mask,
            average=self.cfg.length_normalize,
        )
        return self.cfg.beta * h

    def loss(self, model: nn.Module, batch: OfflinePairBatch) -> tuple[Tensor, dict[str, float]]:
        assert batch.ref_logp is not None
        tokens, b = batch.tokens, batch.pairs
        mask = tokens.loss_mask
        logp = pair_token_logprobs(model, tokens.input_ids, tokens.attention_mask, mask)
        h = sequence_logratios(logp, batch.ref_logp, mask, average=self.cfg.length_normalize)
        loss, stats = preference_loss(
            h[:b], h[b:], self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing
        )
        with torch.no_grad():
            seq_logp = sequence_logprobs(logp.detach(), mask)
            stats["chosen_logp"] = float(seq_logp[:b].mean())
            stats["rejected_logp"] = float(seq_logp[b:].mean())
        return loss, stats


class RewardModelStage(_PairStream):
    """A Bradley–Terry reward model: the trained model's body plus a scalar head (module
    docstring). The head is the stage's parameter, in its state dict and in every checkpoint
    folder as :data:`REWARD_HEAD_FILE`."""

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        device: torch.device,
    ) -> None:
        super().__init__(recipe, tokenizer, model, device)
        self.head = nn.Linear(model.config.hidden_size, 1).to(device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def save_extra(self, folder: Path) -> None:
        """Called by the loop for every checkpoint (and ``model/``) while the folder is still
        temporary, so the head lands atomically with the weights."""
        save_reward_head(self.head, folder)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.head.load_state_dict(state["head"])  # in place: the optimizer keeps the tensors

    # the LM head of a reward model is never trained: judge it by its scores alone
    generation_eval = False

    def next_batch(self) -> OfflinePairBatch:
        return OfflinePairBatch(self.draw_pairs())

    def pair_scores(self, model: nn.Module, tokens: TokenBatch) -> Tensor:
        return last_token_scores(model, self.head, tokens.input_ids, tokens.attention_mask)

    def loss(self, model: nn.Module, batch: OfflinePairBatch) -> tuple[Tensor, dict[str, float]]:
        tokens, b = batch.tokens, batch.pairs
        scores = last_token_scores(model, self.head, tokens.input_ids, tokens.attention_mask)
        loss, stats = bradley_terry_loss(scores[:b], scores[b:])
        stats["chosen_score"] = float(scores[:b].detach().mean())
        stats["rejected_score"] = float(scores[b:].detach().mean())
        return loss, stats
