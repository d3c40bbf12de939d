"""A user's prompt/completion pairs, or prompts alone, from a JSON Lines file, as a task.

One JSON object per line, e.g. ``{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}``. Every other
column of a row is kept (``{"prompt": ..., "answer": "4", "tests": [...]}``): a problem's
``fields`` hold the whole row, which a Python reward reads by column name
(:mod:`tether.rewards.functions`).

**Prompt-only rows** (``completion_field=None``, the recipe's ``task.completion_field: null``)
are for the stages that sample their completions (rl, online-dpo, xpo, dpg): a row needs
only its prompt, and its other columns (a reference answer, test cases) go to the reward. Such
a task has no demonstrations, so ``pretrain_problem`` (what mle and iqlearn train on) is a
one-line :class:`DatasetError`, and no reference to check a completion against: its own
``is_correct`` is False and ``score`` 0 for every completion, and the recipe's ``reward``
section must judge the samples (``reward.kind`` python or model; the checker and the graded
score are refused when the reward is built). Its generation budget is
:data:`PROMPT_ONLY_MAX_NEW_TOKENS` unless given (``rl.max_new_tokens`` and the like).

The file is read here, line by line, rather than by ``datasets``' JSON
loader, because that loader reports a bad file with pyarrow errors that name neither the line
nor the problem. The validated rows are then held in a Hugging Face ``datasets.Dataset``
(:func:`load_pair_dataset`): Arrow storage, compact for large SFT sets, with ``map``,
``shuffle`` and ``push_to_hub`` for free.

**Errors and skips.** Whatever stops the file being read as a whole is a :class:`DatasetError`
(one line, naming the file and, where there is one, the line): a missing path, a directory,
an unreadable file, bytes that are not UTF-8 (a wrongly encoded file; skipping those rows
would silently drop every row with a non-ASCII character), a file with no rows, and a file
whose rows are all unusable (typically a wrong field name: the message shows the fields of
the first bad row). A bad *row* in an otherwise good file is skipped and counted in the
:class:`SkipReport`, by reason, with its first line numbers; ``strict=True`` makes the first
bad row an error instead. Skip reasons:

- ``not_json``: the line does not parse as JSON (e.g. a truncated last line);
- ``not_object``: the line is JSON but not an object;
- ``missing_field``: the prompt or completion field is absent (the prompt alone for
  prompt-only rows);
- ``not_string``: a field is present but not a string (null included);
- ``bad_text``: a string with an unpaired surrogate escape (``"\\ud800"``), which no
  tokenizer can encode;
- ``empty_completion``: the completion is empty or whitespace (nothing to learn);
- ``too_long``: prompt plus completion exceed ``max_chars`` characters;
- ``same_response``: (preference files only, :mod:`tether.tasks.preferences`) the chosen and
  rejected responses are the same string.

Blank lines are ignored (counted in ``SkipReport.blank_lines``, never an error). A UTF-8 byte
order mark at the start of the file is allowed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
from sacrebleu.metrics import BLEU

from tether.tasks.base import Task

SKIP_REASONS = (
    "not_json",
    "not_object",
    "missing_field",
    "not_string",
    "bad_text",
    "empty_completion",
    "too_long",
    "same_response",  # preference rows (tasks.preferences): chosen == rejected
)
FIRST_LINES_KEPT = 5  # line numbers remembered per skip reason
GENERATION_MARGIN = 16  # as in tasks.addition: EOS plus slack beyond the longest reference
# prompt-only rows: no reference gives a length, so a budget that fits a short answer (a few
# sentences of a byte-level BPE) without making a CPU rollout of a 100M+ model crawl
PROMPT_ONLY_MAX_NEW_TOKENS = 128
_SNIPPET = 60  # characters of a bad line quoted in a message

FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "completion": datasets.Value("string"),  # None in every row of a prompt-only file
        "line": datasets.Value("int64"),
    }
)
# the row's other columns, as one JSON object per row: only when some row has any (JSON values
# of any type and any mix of types across rows, which an Arrow column of its own could not hold)
FIELDS = "fields"


class DatasetError(ValueError):
    """A data file that cannot be used; the one-line message names the file, line and why."""


@dataclass(frozen=True)
class Pair:
    """One row: its prompt, its completion (None in a prompt-only file), its 1-based ``line``
    in the file, and ``fields``, every column of the row by the file's own names (what a
    Python reward reads; not part of equality)."""

    prompt: str
    completion: str | None
    line: int = 0
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def target(self) -> str:
        """The reference completion (the name every task's problems share)."""
        if self.completion is None:
            raise DatasetError(NO_DEMONSTRATIONS)
        return self.completion


NO_DEMONSTRATIONS = (
    "task.completion_field is null: prompt-only rows hold no demonstrations, which train.stage "
    "mle and iqlearn learn from (use rl, online-dpo, xpo or dpg, or name the completion column)"
)


@dataclass
class SkipReport:
    """What a load kept and what it skipped, by reason (see the module docstring)."""

    path: str
    rows: int = 0  # non-blank lines seen
    kept: int = 0
    blank_lines: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_lines: dict[str, list[int]] = field(default_factory=dict)
    first_detail: dict[str, str] = field(default_factory=dict)  # the first message per reason

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, reason: str, line: int, detail: str) -> None:
        self.skipped[reason] += 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < FIRST_LINES_KEPT:
            lines.append(line)
        self.first_detail.setdefault(reason, detail)

    def skipped_summary(self) -> str:
        """The skips alone, e.g. ``1 not_json (line 7), 3 too_long (lines 9, 12, 20)``."""
        parts = []
        for reason in SKIP_REASONS:
            count = self.skipped[reason]
            if count:
                lines = ", ".join(str(n) for n in self.first_lines[reason])
                more = ", ..." if count > len(self.first_lines[reason]) else ""
                word = "line" if count == 1 else "lines"
                parts.append(f"{count} {reason} ({word} {lines}{more})")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line, e.g. ``kept 98 of 100 rows of data.jsonl; skipped 2: 1 not_json (line
        7), 1 too_long (line 9)``."""
        head = f"kept {self.kept} of {self.rows} rows of {self.path}"
        if not self.skipped:
            return head
        return f"{head}; skipped {self.total_skipped}: {self.skipped_summary()}"


def _snippet(text: str) -> str:
    short = text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."
    return repr(short)  # repr keeps the message on one line


def _check_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class RowSkip(NamedTuple):
    """Why a row is skipped: a reason from :data:`SKIP_REASONS` and a one-line detail."""

    reason: str
    detail: str


def check_string_fields(obj: Any, names: Sequence[str]) -> list[str] | RowSkip:
    """The values of the string fields ``names`` of a parsed row, in that order, else why the
    row is skipped (``not_object``, ``missing_field``, ``not_string``, ``bad_text``).
    Shared by every JSONL row format (prompt/completion here, preference pairs in
    :mod:`tether.tasks.preferences`)."""
    if not isinstance(obj, dict):
        return RowSkip("not_object", f"expected a JSON object, got {type(obj).__name__}")
    values = []
    for name in names:
        if name not in obj:
            fields = ", ".join(_snippet(k) for k in list(obj)[:8]) or "none"
            return RowSkip("missing_field", f"no field {name!r} (fields: {fields})")
        value = obj[name]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return RowSkip("not_string", f"field {name!r} is {kind}, expected a string")
        if not _check_text(value):
            return RowSkip("bad_text", f"field {name!r} has an unpaired surrogate escape")
        values.append(value)
    return values


def _check_row(
    obj: Any, prompt_field: str, completion_field: str | None, max_chars: int | None
) -> tuple[str, str | None, str | None] | RowSkip:
    """(prompt, completion, the other columns as JSON or None) for a usable row, else why it
    is skipped. Prompt-only rows (``completion_field`` None) have no completion."""
    names = (prompt_field,) if completion_field is None else (prompt_field, completion_field)
    values = check_string_fields(obj, names)
    if isinstance(values, RowSkip):
        return values
    prompt, completion = values[0], (values[1] if completion_field is not None else None)
    if completion is not None and not completion.strip():
        return RowSkip("empty_completion", f"field {completion_field!r} is empty")
    n = len(prompt) + len(completion or "")
    if max_chars is not None and n > max_chars:
        what = "prompt" if completion is None else "prompt + completion"
        return RowSkip("too_long", f"{what} is {n} characters, over max_chars={max_chars}")
    others = {k: v for k, v in obj.items() if k not in names}
    return prompt, completion, json.dumps(others, ensure_ascii=False) if others else None


def _read_rows(
    path: str | Path,
    prompt_field: str,
    completion_field: str | None,
    max_chars: int | None,
    strict: bool,
) -> tuple[dict[str, list[Any]], SkipReport]:
    """Validate the file line by line: the kept columns and the report. Raises DatasetError."""
    if not prompt_field or completion_field == "" or prompt_field == completion_field:
        raise ValueError(
            f"prompt_field and completion_field must be two different non-empty names (or no "
            f"completion_field), got {prompt_field!r} and {completion_field!r}"
        )
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    columns, report = read_jsonl_rows(
        path,
        ("prompt", "completion", FIELDS),
        lambda obj: _check_row(obj, prompt_field, completion_field, max_chars),
        strict,
    )
    if all(f is None for f in columns[FIELDS]):  # no row has other columns
        del columns[FIELDS]
    else:
        columns[FIELDS] = [f or "{}" for f in columns[FIELDS]]
    return columns, report


def read_jsonl_rows(
    path: str | Path,
    columns_out: Sequence[str],
    check: Callable[[Any], Sequence[str | None] | RowSkip],
    strict: bool,
) -> tuple[dict[str, list[Any]], SkipReport]:
    """Read a JSON Lines file line by line: ``check`` turns each parsed row into the values of
    ``columns_out`` (in order) or a :class:`RowSkip`. Returns the kept columns (plus ``line``)
    and the report; raises :class:`DatasetError` for an unusable file (module docstring)."""
    p = Path(path)
    name = str(p)
    if not p.exists():
        raise DatasetError(f"{name}: no such file")
    if p.is_dir():
        raise DatasetError(f"{name}: is a directory, expected a JSON Lines file")
    report = SkipReport(path=name)
    columns: dict[str, list[Any]] = {name: [] for name in (*columns_out, "line")}
    looks_like_array = False
    try:
        with p.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DatasetError(
                        f"{name}: line {lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at "
                        f"column {err.start + 1}); re-encode the file as UTF-8"
                    ) from None
                if not text.strip():
                    report.blank_lines += 1
                    continue
                report.rows += 1
                outcome: Sequence[str | None] | RowSkip
                try:
                    obj = json.loads(text)
                except (ValueError, RecursionError) as err:
                    # JSONDecodeError, an integer over Python's digit limit, deep nesting
                    if report.rows == 1 and text.lstrip().startswith("["):
                        looks_like_array = True
                    if isinstance(err, json.JSONDecodeError):
                        why = f"{err.msg}, column {err.colno}"
                    else:
                        why = str(err).splitlines()[0] if str(err) else type(err).__name__
                    outcome = RowSkip("not_json", f"not JSON ({why}): {_snippet(text.strip())}")
                else:
                    if report.rows == 1 and isinstance(obj, list):
                        looks_like_array = True  # a whole JSON array on one line
                    outcome = check(obj)
                if isinstance(outcome, RowSkip):
                    if strict:
                        raise DatasetError(f"{name}: line {lineno}: {outcome.detail} (strict)")
                    report.add(outcome.reason, lineno, outcome.detail)
                    continue
                for column, value in zip(columns_out, outcome, strict=True):
                    columns[column].append(value)
                columns["line"].append(lineno)
                report.kept += 1
    except OSError as err:
        raise DatasetError(f"{name}: cannot read ({err.strerror or type(err).__name__})") from None
    if report.rows == 0:
        what = "only blank lines" if report.blank_lines else "empty file"
        raise DatasetError(f"{name}: no rows ({what})")
    if report.kept == 0:
        reason = report.skipped.most_common(1)[0][0]
        line = report.first_lines[reason][0]
        hint = ""
        if looks_like_array:
            hint = "; this looks like a JSON array, not JSON Lines (one object per line)"
        raise DatasetError(
            f"{name}: no usable rows ({report.skipped_summary()}); first problem, "
            f"line {line}: {report.first_detail[reason]}{hint}"
        )
    return columns, report


def load_pair_dataset(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    completion_field: str | None = "completion",
    max_chars: int | None = None,
    strict: bool = False,
) -> tuple[datasets.Dataset, SkipReport]:
    """The usable rows as a ``datasets.Dataset`` with string columns ``prompt`` and
    ``completion`` (whatever the file calls them; all None for prompt-only rows,
    ``completion_field=None``) and int ``line``, plus the skip report. When some row has other
    columns, a string column ``fields`` holds each row's other columns as a JSON object.

    Raises :class:`DatasetError` for an unusable file, or any bad row when ``strict``
    (module docstring), and ``ValueError`` for bad arguments.
    """
    columns, report = _read_rows(path, prompt_field, completion_field, max_chars, strict)
    features = FEATURES
    if FIELDS in columns:
        features = datasets.Features({**FEATURES, FIELDS: datasets.Value("string")})
    return datasets.Dataset.from_dict(columns, features=features), report


ScoreMetric = Literal["bleu", "exact"]


class DatasetRows(Task):
    """Rows of a ``datasets.Dataset`` as task problems: drawn uniformly with the caller's rng,
    the same for pre-training and RL (the rows are the demonstrations). Subclasses say how a
    row becomes a problem (``pair``)."""

    dataset: datasets.Dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def pair(self, index: int) -> Any:
        raise NotImplementedError

    def pretrain_problem(self, rng: random.Random) -> Any:
        return self.pair(rng.randrange(len(self.dataset)))

    def rl_problem(self, rng: random.Random) -> Any:
        return self.pretrain_problem(rng)


class JsonlTask(DatasetRows):
    """SFT data (or prompts alone) from a user's file, behind the same Task protocol as the
    built-in tasks.

    Pre-training and RL problems are rows drawn uniformly with the caller's ``rng`` (the
    rows are the expert demonstrations; there is no separate RL split). ``is_correct`` is an
    exact match with the reference completion after stripping surrounding whitespace.
    ``score`` is sentence BLEU against the reference divided by 100 (``metric="bleu"``, with
    sacrebleu's ``bleu_tokenize``, default ``13a`` for word-level text; use ``char`` for text
    without spaces) or the exact match as 0/1 (``metric="exact"``). BLEU of a single sentence
    is noisy and only a graded proxy; exact matches always score 1.

    The generation budget defaults to the longest reference in UTF-8 bytes plus a margin: an
    upper bound on its length in tokens for the char tokenizer and for byte-level BPE ones.

    ``completion_field=None`` makes a prompt-only task (module docstring): no demonstrations
    (``pretrain_problem`` raises :class:`DatasetError`), no reference (``is_correct`` False,
    ``score`` 0: the recipe's reward judges), ``has_references`` False.
    ``prompt_field`` and ``completion_field`` are the file's names for the two columns, under
    which a problem's ``fields`` hold them.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        report: SkipReport | None = None,
        *,
        metric: ScoreMetric = "bleu",
        bleu_tokenize: str = "13a",
        max_new_tokens: int | None = None,
        prompt_field: str = "prompt",
        completion_field: str | None = "completion",
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("JsonlTask needs at least one row")
        if metric not in ("bleu", "exact"):
            raise ValueError(f"unknown metric {metric!r}: choose 'bleu' or 'exact'")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        self.dataset = dataset
        self.report = report
        self.metric: ScoreMetric = metric
        self.prompt_field, self.completion_field = prompt_field, completion_field
        self._bleu = None
        if metric == "bleu":
            self._bleu = BLEU(effective_order=True, tokenize=bleu_tokenize)
        if max_new_tokens is None and not self.has_references:
            max_new_tokens = PROMPT_ONLY_MAX_NEW_TOKENS
        elif max_new_tokens is None:
            longest = max(len(c.encode("utf-8")) for c in dataset["completion"])
            max_new_tokens = longest + GENERATION_MARGIN
        self._max_new_tokens = max_new_tokens

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        prompt_field: str = "prompt",
        completion_field: str | None = "completion",
        max_chars: int | None = None,
        strict: bool = False,
        metric: ScoreMetric = "bleu",
        bleu_tokenize: str = "13a",
        max_new_tokens: int | None = None,
    ) -> JsonlTask:
        """Load ``path`` with :func:`load_pair_dataset` (same errors) and wrap it; the skip
        report is kept as ``.report`` for the caller to log (``report.summary()``)."""
        ds, report = load_pair_dataset(
            path,
            prompt_field=prompt_field,
            completion_field=completion_field,
            max_chars=max_chars,
            strict=strict,
        )
        return cls(
            ds,
            report,
            metric=metric,
            bleu_tokenize=bleu_tokenize,
            max_new_tokens=max_new_tokens,
            prompt_field=prompt_field,
            completion_field=completion_field,
        )

    @property
    def has_references(self) -> bool:
        """Whether rows carry a reference completion (False: prompt-only rows)."""
        return self.completion_field is not None

    @property
    def source(self) -> str:
        """The file the rows came from, for messages."""
        return self.report.path if isinstance(self.report, SkipReport) else "the task's rows"

    def pair(self, index: int) -> Pair:
        row = self.dataset[index]
        fields = json.loads(row[FIELDS]) if row.get(FIELDS) else {}
        fields[self.prompt_field] = row["prompt"]
        if self.completion_field is not None:
            fields[self.completion_field] = row["completion"]
        completion = row["completion"] if self.has_references else None
        return Pair(row["prompt"], completion, int(row["line"]), fields)

    def pretrain_problem(self, rng: random.Random) -> Pair:
        if not self.has_references:
            raise DatasetError(f"{self.source}: {NO_DEMONSTRATIONS}")
        return self.pair(rng.randrange(len(self.dataset)))

    def rl_problem(self, rng: random.Random) -> Pair:
        return self.pair(rng.randrange(len(self.dataset)))

    def rows_without(self, column: str) -> list[int]:
        """The lines of the rows that have no column ``column`` (a reward's parameter)."""
        if column in (self.prompt_field, self.completion_field):
            return []
        if FIELDS not in self.dataset.column_names:
            return list(self.dataset["line"])
        return [
            int(line)
            for line, text in zip(self.dataset["line"], self.dataset[FIELDS], strict=True)
            if column not in json.loads(text)
        ]

    def column_names(self) -> list[str]:
        """Every column some row has, the prompt and completion columns first."""
        names = [self.prompt_field] + [n for n in (self.completion_field,) if n is not None]
        if FIELDS in self.dataset.column_names:
            for text in self.dataset[FIELDS]:
                names += [k for k in json.loads(text) if k not in names]
        return names

    def is_correct(self, problem: Pair, completion: str) -> bool:
        """Exact match after stripping surrounding whitespace (False without a reference);
        never raises."""
        if problem.completion is None:
            return False
        return isinstance(completion, str) and completion.strip() == problem.completion.strip()

    def score(self, problem: Pair, completion: str) -> float:
        """In [0, 1]: BLEU/100 or exact match (see the class docstring), 0 without a
        reference; never raises."""
        if self.is_correct(problem, completion):
            return 1.0
        if self._bleu is None or not isinstance(completion, str) or problem.completion is None:
            return 0.0
        try:
            bleu = self._bleu.sentence_score(completion, [problem.completion]).score
        except Exception:  # a metric must not stop training on odd output; count it as 0
            return 0.0
        return min(max(bleu / 100.0, 0.0), 1.0)

    def max_new_tokens(self) -> int:
        return self._max_new_tokens
