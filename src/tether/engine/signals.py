"""Signals of a broken set-up: one-line warnings while a run trains.

A run can go through the motions and learn nothing: the prompts are formatted wrong and every
completion runs to ``max_new_tokens``, the model ends at once, the reward never varies, the
prioritised KL weighs every token 0. :class:`SetupMonitor` reads each step's figures (the
stats dict of the step's loss) and, when one of these holds for several steps in a row, says
so once, in one line on stderr, with what to check. The figures it reads are emitted by the
stages that sample (``rl``, ``online-dpo``, ``xpo``, ``dpg``; :func:`tether.stages.base.
sample_health`) and by the RL loss (the prioritised KL's weights); a stage that does not emit
a figure is not watched for it.

=======================  ==========================================  ======================
figure                   the condition, for K steps in a row          K
=======================  ==========================================  ======================
``frac_constant_groups`` = 1: every prompt's samples got one reward   :data:`REWARD_STEPS`
``frac_truncated``       = 1: every completion hit max_new_tokens     :data:`STEPS`
``frac_empty``           > 1/2: most completions are blank            :data:`STEPS`
``kl_weight_low``        > 0.95: almost every weight is near 0        :data:`STEPS`
``kl_weight_high``       > 0.99: almost every weight is near 1        :data:`STEPS`
=======================  ==========================================  ======================

A prompt group is a prompt's samples (RL's ``rl.group_size``, DPG's samples per prompt, an
online pair); with one sample per prompt the step's batch counts as one group. A constant
reward needs a longer run of steps: on a hard task a few prompts whose samples all
fail are no fault, while a reward that never differs within any group for ten steps gives RL,
online DPO and DPG nothing to learn from. Each warning is printed once per run and kept in
``summary.json`` (``warnings``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

STEPS = 3  # consecutive steps before a warning on completions or KL weights
REWARD_STEPS = 10  # consecutive steps of constant rewards within every group


@dataclass(frozen=True)
class Signal:
    """One condition on one figure of a step, and the line that explains it."""

    key: str
    holds: Callable[[float], bool]
    steps: int
    message: str


SIGNALS: tuple[Signal, ...] = (
    Signal(
        "frac_constant_groups",
        lambda v: v >= 1.0,
        REWARD_STEPS,
        "every prompt's samples got the same reward for {n} steps: no learning signal; check "
        "the reward function (does it ever differ?), the task's difficulty (all wrong or all "
        "right) and the sampling temperature",
    ),
    Signal(
        "frac_truncated",
        lambda v: v >= 1.0,
        STEPS,
        "every completion ran to max_new_tokens for {n} steps: raise max_new_tokens, or the "
        "prompts' chat template or EOS is wrong (task.chat_template; the model never ends)",
    ),
    Signal(
        "frac_empty",
        lambda v: v > 0.5,
        STEPS,
        "most completions were empty for {n} steps (the model ends at once): check the prompt "
        "format (task.chat_template, task.system_prompt) and the EOS",
    ),
    Signal(
        "kl_weight_low",
        lambda v: v > 0.95,
        STEPS,
        "almost every prioritised-KL weight is near 0 for {n} steps: the KL is off; lower "
        "rl.certainty_exponent",
    ),
    Signal(
        "kl_weight_high",
        lambda v: v > 0.99,
        STEPS,
        "almost every prioritised-KL weight is near 1 for {n} steps: nothing is prioritised; "
        "raise rl.certainty_exponent",
    ),
)

KEYS: tuple[str, ...] = tuple(s.key for s in SIGNALS)


class SetupMonitor:
    """Counts, per signal, the consecutive steps on which it held; returns each warning once."""

    def __init__(self, signals: tuple[Signal, ...] = SIGNALS) -> None:
        self.signals = signals
        self.streak = {s.key: 0 for s in signals}
        self.warned: set[str] = set()
        self.warnings: list[str] = []  # every line given so far, for summary.json

    def observe(self, step: int, stats: dict[str, float]) -> list[str]:
        """The new warning lines of ``step`` (usually none) from its figures ``stats``."""
        lines = []
        for s in self.signals:
            value = stats.get(s.key)
            if value is None or not s.holds(float(value)):
                self.streak[s.key] = 0
                continue
            self.streak[s.key] += 1
            if self.streak[s.key] >= s.steps and s.key not in self.warned:
                self.warned.add(s.key)
                lines.append(f"warning: step {step}: {s.message.format(n=s.steps)} ({s.key})")
        self.warnings += lines
        return lines
