"""The model a benchmark runs and the task that suits it: ``tether bench ... --model X``.

``X`` is anything tether loads (:func:`tether.models.loading.resolve_checkpoint`): a shipped
checkpoint (``addition-n3``), an installed model by name (``smollm2-135m-instruct``, or
``smollm2`` for short), a tether checkpoint or run directory, any Hugging Face folder, or a
``.gguf`` file. The task each job draws its examples from follows the model:

=====================================  =====================================================
model                                  jobs' data
=====================================  =====================================================
a tether checkpoint of the addition    addition at its recorded N (SFT/MLE: 1..N digits; RL:
task (``tether.json`` records it)      N+1 digits); DPO: ``multistep-prefs`` (2-digit sums)
a model with a chat template           ``word-problems`` at 1 digit through the template, as
(SmolLM2-135M-Instruct)                the ``*-smollm2`` recipes (SFT/MLE and RL); DPO:
                                       ``word-problems-prefs``; LoRA r = 8 by default
any other model                        addition at the recipe's default N = 3
=====================================  =====================================================

Bad input (no such model, a folder that holds none) is a :class:`ModelLoadError` whose one
line the command prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tether.config import TaskConfig
from tether.models.loading import SMOLLM2, ModelLoadError, checkpoint_task, resolve_checkpoint

BenchKind = Literal["addition", "chat"]
# short names `tether bench --model` takes besides tether's own
ALIASES = {"smollm2": SMOLLM2}
# the RL job's completion length when --max-new-tokens is not given: addition-n3's 4-digit
# scratchpads fit in 300; a bare number from SmolLM2 takes 1-3 tokens (the 24)
DEFAULT_MAX_NEW_TOKENS: dict[BenchKind, int] = {"addition": 300, "chat": 24}
# rows per step when none is asked for: a 135M chat model's SFT step at 64 rows in fp32 ran
# the development machine (24 GiB) out of memory on TRL's side
DEFAULT_BATCH_SIZE: dict[BenchKind, int] = {"addition": 64, "chat": 16}
CHAT_LORA_RANK = 8  # rl-smollm2 and dpo-smollm2's adapters


@dataclass(frozen=True)
class BenchTarget:
    """A benchmark's model (``init``: what ``model.init`` gets) and its jobs' tasks."""

    init: str
    kind: BenchKind
    max_digits: int = 3  # addition: N

    @property
    def task(self) -> list[str]:
        """Recipe overrides of the SFT/MLE, IQLearn and RL jobs' task."""
        if self.kind == "chat":
            return ["task.name=word-problems", "task.max_digits=1", "task.chat_template=auto"]
        return ["task.name=addition", f"task.max_digits={self.max_digits}"]

    @property
    def dpo_task(self) -> list[str]:
        """Recipe overrides of the DPO job's preference task."""
        if self.kind == "chat":
            return ["task.name=word-problems-prefs", "task.max_digits=1", "task.chat_template=auto"]
        return ["task.name=multistep-prefs", "task.max_digits=2"]

    @property
    def default_lora(self) -> int:
        """LoRA rank when none is asked for: the SmolLM2 recipes' 8 on a chat model, else 0
        (every weight trains)."""
        return CHAT_LORA_RANK if self.kind == "chat" else 0

    @property
    def default_max_new_tokens(self) -> int:
        return DEFAULT_MAX_NEW_TOKENS[self.kind]

    @property
    def default_batch_size(self) -> int:
        return DEFAULT_BATCH_SIZE[self.kind]


def bench_target(name: str) -> BenchTarget:
    """The model ``name`` names and the tasks that suit it (module docstring).
    ModelLoadError (one line) for a name or path that holds no model."""
    init = ALIASES.get(name, name)
    path = resolve_checkpoint(init)
    task = checkpoint_task(path) if path.is_dir() else {}
    if task.get("name") == "addition":
        return BenchTarget(init, "addition", int(task.get("max_digits") or TaskConfig().max_digits))
    if init == SMOLLM2 or has_chat_template(path):  # SmolLM2's GGUF: known without reading it
        return BenchTarget(init, "chat")
    return BenchTarget(init, "addition", TaskConfig().max_digits)


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer saved at ``path`` has a chat template: in ``chat_template.jinja``
    or ``tokenizer_config.json`` of a folder, or in a GGUF file's metadata (read with the
    tokenizer, a few seconds)."""
    if path.is_dir():
        if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
            return True
        config = path / "tokenizer_config.json"
        if not config.is_file():
            return False
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except (ValueError, AttributeError) as err:
            raise ModelLoadError(
                f"checkpoint {str(path)!r}: tokenizer_config.json is not a JSON object ({err})"
            ) from None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"checkpoint {str(path)!r}: could not load ({err})") from None
    return bool(getattr(tokenizer, "chat_template", None))
