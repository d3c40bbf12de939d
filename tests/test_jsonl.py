"""Prompt/completion JSON Lines: good files load, bad rows are counted skips (or errors under
strict), unusable files are one-line errors naming the file and line."""

import json
import random

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.tasks.jsonl import (
    PROMPT_ONLY_MAX_NEW_TOKENS,
    DatasetError,
    JsonlTask,
    Pair,
    load_pair_dataset,
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(prompt="Q:", completion=" A", **extra):
    return json.dumps({"prompt": prompt, "completion": completion, **extra})


def load_pairs(path, **options):
    """The kept rows as Pair objects in file order, and the skip report: what
    :func:`load_pair_dataset` read (the rows a JsonlTask trains on)."""
    ds, report = load_pair_dataset(path, **options)
    rows = zip(ds["prompt"], ds["completion"], ds["line"], strict=True)
    return [Pair(p, c, int(n)) for p, c, n in rows], report


def assert_one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_good_file_loads_in_order_with_line_numbers(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [row("a", "1", extra=3), "", row("b", "2 é ✓"), "   ", row("", "3")],
    )
    pairs, report = load_pairs(path)
    assert pairs == [Pair("a", "1", 1), Pair("b", "2 é ✓", 3), Pair("", "3", 5)]
    assert pairs[0].target == "1"
    assert report.kept == report.rows == 3 and report.blank_lines == 2
    assert report.total_skipped == 0
    assert report.summary() == f"kept 3 of 3 rows of {path}"


def test_dataset_is_a_hugging_face_dataset_with_fixed_columns(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"q": "x", "a": "y"})])
    ds, _ = load_pair_dataset(path, prompt_field="q", completion_field="a")
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "completion", "line"]
    assert ds[0] == {"prompt": "x", "completion": "y", "line": 1}


def test_crlf_and_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row().encode() + b"\r\n" + row("b", "c").encode() + b"\r\n")
    pairs, _ = load_pairs(path)
    assert [p.prompt for p in pairs] == ["Q:", "b"]


def test_bad_rows_are_counted_skips(tmp_path):
    lines = [
        row(),  # 1 ok
        '{"prompt": "x", "completion": ',  # 2 truncated
        "[1, 2]",  # 3 not an object
        json.dumps({"prompt": "x"}),  # 4 missing completion
        json.dumps({"prompt": 3, "completion": "y"}),  # 5 not a string
        json.dumps({"prompt": "x", "completion": None}),  # 6 null
        row("x", "   "),  # 7 empty completion
        row("x" * 50, "y" * 60),  # 8 too long
        '{"prompt": "x", "completion": "\\ud800"}',  # 9 unpaired surrogate
        row("x", ""),  # 10 empty completion
        row("last", "ok"),  # 11 ok
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    pairs, report = load_pairs(path, max_chars=100)
    assert [p.line for p in pairs] == [1, 11]
    assert report.rows == 11 and report.kept == 2 and report.total_skipped == 9
    assert dict(report.skipped) == {
        "not_json": 1,
        "not_object": 1,
        "missing_field": 1,
        "not_string": 2,
        "empty_completion": 2,
        "too_long": 1,
        "bad_text": 1,
    }
    assert report.first_lines["not_string"] == [5, 6]
    assert report.first_lines["empty_completion"] == [7, 10]
    assert report.first_detail["not_string"] == "field 'prompt' is int, expected a string"
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith(f"kept 2 of 11 rows of {path}; skipped 9: 1 not_json (line 2)")
    assert "2 empty_completion (lines 7, 10)" in summary


def test_first_lines_are_capped(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row()] + ["oops"] * 8)
    _, report = load_pairs(path)
    assert report.first_lines["not_json"] == [2, 3, 4, 5, 6]
    assert "8 not_json (lines 2, 3, 4, 5, 6, ...)" in report.summary()


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("not json", "not JSON"),
        ('"a string"', "expected a JSON object, got str"),
        (json.dumps({"prompt": "x"}), "no field 'completion'"),
        (json.dumps({"prompt": "x", "completion": 1}), "field 'completion' is int"),
        (json.dumps({"prompt": None, "completion": "y"}), "field 'prompt' is null"),
        (row("x", ""), "is empty"),
        (row("x" * 200, "y"), "over max_chars=100"),
    ],
)
def test_strict_makes_any_bad_row_an_error(tmp_path, bad, needle):
    path = write_lines(tmp_path / "d.jsonl", [row(), bad, row()])
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path, max_chars=100, strict=True)
    assert_one_line_error(exc_info, str(path), "line 2", needle)
    load_pairs(path, max_chars=100)  # without strict it is a skip


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(tmp_path / "nope.jsonl")
    assert_one_line_error(exc_info, "nope.jsonl", "no such file")


def test_directory_is_an_error(tmp_path):
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(tmp_path)
    assert_one_line_error(exc_info, str(tmp_path), "is a directory")


@pytest.mark.parametrize(("content", "needle"), [(b"", "empty file"), (b"\n  \n", "blank")])
def test_empty_file_is_an_error(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path)
    assert_one_line_error(exc_info, str(path), "no rows", needle)


def test_non_utf8_bytes_are_an_error_naming_line_and_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        row().encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1")
    )
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path)
    assert_one_line_error(exc_info, str(path), "line 2", "not UTF-8", "0xe9", "column 16")


def test_no_usable_rows_is_an_error_with_a_hint_about_field_names(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"question": "x", "answer": "y"})] * 3)
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path)
    assert_one_line_error(
        exc_info, str(path), "no usable rows", "3 missing_field", "line 1", "'question', 'answer'"
    )


def test_a_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}], indent=1))
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path)
    assert_one_line_error(exc_info, "no usable rows", "JSON array, not JSON Lines")
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]))  # on one line
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path)
    assert_one_line_error(exc_info, "1 not_object", "JSON array, not JSON Lines")


def test_huge_integer_and_deep_nesting_are_not_json_skips(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(), "1" * 5000, "[" * 100_000])
    _, report = load_pairs(path)
    assert report.skipped["not_json"] == 2


def test_unreadable_file_is_an_error(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "d.jsonl", [row()])

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "open", denied)  # chmod 0 does not stop root
    with pytest.raises(DatasetError) as exc_info:
        load_pairs(path)
    assert_one_line_error(exc_info, str(path), "cannot read (Permission denied)")


def test_bad_arguments_are_value_errors(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row()])
    with pytest.raises(ValueError, match="different"):
        load_pairs(path, prompt_field="x", completion_field="x")
    with pytest.raises(ValueError, match="max_chars"):
        load_pairs(path, max_chars=0)


JSON_ROWS = st.dictionaries(
    st.sampled_from(["prompt", "completion", "other"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=12)),
).map(json.dumps)
LINES = st.one_of(
    JSON_ROWS.map(str.encode),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(LINES, max_size=6), st.booleans())
def test_arbitrary_bytes_load_or_raise_a_one_line_dataset_error(tmp_path_factory, lines, strict):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        pairs, report = load_pairs(path, max_chars=20, strict=strict)
    except DatasetError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert report.kept == len(pairs) >= 1
        assert report.kept + report.total_skipped == report.rows
        assert all(p.completion.strip() and len(p.prompt + p.completion) <= 20 for p in pairs)


# ----------------------------------------------------------------------------- the task


@pytest.fixture
def sft_file(tmp_path):
    rows = [row(f"Q{i}:", f" the answer is {i}") for i in range(5)] + [row("bad", "")]
    return write_lines(tmp_path / "sft.jsonl", rows)


def test_task_samples_rows_with_the_rng(sft_file):
    task = JsonlTask.from_file(sft_file)
    assert (
        len(task) == 5 and task.report is not None and task.report.skipped["empty_completion"] == 1
    )
    a = [task.pretrain_problem(random.Random(7)).prompt for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same row
    rng = random.Random(0)
    seen = {task.rl_problem(rng).prompt for _ in range(100)}
    assert seen == {f"Q{i}:" for i in range(5)}
    assert task.max_new_tokens() == len(" the answer is 0") + 16


def test_task_checker_and_bleu_score(sft_file):
    task = JsonlTask.from_file(sft_file)
    p = task.pair(2)
    assert p == Pair("Q2:", " the answer is 2", 3)
    assert task.is_correct(p, "the answer is 2\n")
    assert not task.is_correct(p, "the answer is 3")
    assert task.score(p, " the answer is 2 ") == 1.0
    partial = task.score(p, "the answer is 3")
    assert 0.0 < partial < 1.0
    assert task.score(p, "zzz") == 0.0
    exact = JsonlTask.from_file(sft_file, metric="exact", max_new_tokens=40)
    assert exact.score(p, "the answer is 3") == 0.0 and exact.score(p, p.target) == 1.0
    assert exact.max_new_tokens() == 40


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_task_checkers_never_raise(text):
    task = TASK_FOR_FUZZ
    p = Pair("Q:", "some reference text 12+3=15")
    assert isinstance(task.is_correct(p, text), bool)
    assert 0.0 <= task.score(p, text) <= 1.0


TASK_FOR_FUZZ = JsonlTask(
    datasets.Dataset.from_dict({"prompt": ["Q:"], "completion": ["x"], "line": [1]})
)


def test_task_rejects_bad_arguments():
    ds = datasets.Dataset.from_dict({"prompt": ["Q:"], "completion": ["x"], "line": [1]})
    with pytest.raises(ValueError, match="metric"):
        JsonlTask(ds, metric="rouge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one row"):
        JsonlTask(ds.select([]))


# ---------------------------------------------------------------- prompt-only rows, extra columns


def test_prompt_only_rows_keep_every_other_column(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"question": "2+2?", "answer": "4", "tests": [[2, 2]], "id": 7}),
            json.dumps({"question": "1+1?", "answer": 2}),  # columns of other types, or absent
            json.dumps({"answer": "3"}),  # no prompt: skipped
        ],
    )
    task = JsonlTask.from_file(path, prompt_field="question", completion_field=None)
    assert len(task) == 2 and task.report.skipped["missing_field"] == 1
    assert not task.has_references and task.source == str(path)
    first = task.pair(0)
    assert first == Pair("2+2?", None, 1) and first.completion is None
    assert first.fields == {"question": "2+2?", "answer": "4", "tests": [[2, 2]], "id": 7}
    assert task.pair(1).fields == {"question": "1+1?", "answer": 2}
    assert task.column_names() == ["question", "answer", "tests", "id"]
    assert task.rows_without("answer") == [] and task.rows_without("id") == [2]
    assert task.rows_without("nope") == [1, 2]
    assert task.rl_problem(random.Random(0)).prompt in {"2+2?", "1+1?"}


def test_prompt_only_rows_have_no_demonstrations_and_no_reference(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "Q:", "answer": "4"})])
    task = JsonlTask.from_file(path, completion_field=None)
    with pytest.raises(DatasetError) as info:
        task.pretrain_problem(random.Random(0))
    assert_one_line_error(info, str(path), "task.completion_field is null", "mle and iqlearn")
    p = task.rl_problem(random.Random(0))
    with pytest.raises(DatasetError, match="no demonstrations"):
        _ = p.target
    # no reference: the task's own checker says nothing is right; the reward judges
    assert not task.is_correct(p, "4") and task.score(p, "4") == 0.0
    assert task.max_new_tokens() == PROMPT_ONLY_MAX_NEW_TOKENS
    assert JsonlTask.from_file(path, completion_field=None, max_new_tokens=9).max_new_tokens() == 9


def test_rows_with_a_completion_keep_their_other_columns_too(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row("Q:", " 4", answer=4), row("R:", " 5")])
    ds, _ = load_pair_dataset(path)
    assert ds.column_names == ["prompt", "completion", "fields", "line"]
    task = JsonlTask(ds)
    assert task.has_references and task.pair(0).fields == {
        "prompt": "Q:",
        "completion": " 4",
        "answer": 4,
    }
    assert task.pair(1).fields == {"prompt": "R:", "completion": " 5"}
    assert task.pretrain_problem(random.Random(0)).target in (" 4", " 5")


def test_prompt_only_too_long_counts_the_prompt_alone(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "x" * 10}), '{"prompt": "y"}'])
    task = JsonlTask.from_file(path, completion_field=None, max_chars=5)
    assert len(task) == 1 and "prompt is 10 characters" in task.report.first_detail["too_long"]


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        ({"name": "addition", "completion_field": None}, "is for task.name jsonl only"),
        (
            {"name": "jsonl", "path": "x", "prompt_field": "a", "completion_field": "a"},
            "two different names",
        ),
    ],
)
def test_the_task_section_refuses_prompt_only_elsewhere(task, needle):
    from pydantic import ValidationError

    from tether.config import TaskConfig

    with pytest.raises(ValidationError, match=needle):
        TaskConfig(**task)
    assert TaskConfig(name="jsonl", path="x", completion_field=None).completion_field is None
