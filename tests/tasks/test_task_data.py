"""Prompt datasets: JSONL / Parquet through `datasets`, the task view, and malformed-row errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from respec.tasks import (
    ArithmeticTask, DataError, builtin_prompts, collate_columns, load_prompts, write_task_jsonl,
)

pytest.importorskip("datasets")


@pytest.fixture
def load(tmp_path):
    cache = tmp_path / "hf-cache"
    return lambda path, **kw: load_prompts(path, cache_dir=cache, **kw)


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_task_jsonl_round_trip_matches_builtin_view(tmp_path, load):
    task = ArithmeticTask(seed=4)
    path = write_task_jsonl(tmp_path / "sub" / "task.jsonl", task, 40)
    assert [p.name for p in path.parent.iterdir()] == ["task.jsonl"]  # no temporary file left behind
    loaded = load(path)
    view = builtin_prompts(task, 40)
    assert loaded.records == view.records and len(loaded) == 40
    assert loaded.column_names == ("answer", "family", "solution")
    assert loaded[0].prompt_ids is None and loaded[0].id == "arith-s4-0"
    heldout = builtin_prompts(task, 5, start=5, heldout=True)
    assert [r.id for r in heldout] == [p.id for p in task.heldout(10)[5:]]


def test_jsonl_fields_renamed_ids_defaulted_and_columns_kept(tmp_path, load):
    path = _write_lines(tmp_path / "qa.jsonl", [
        json.dumps({"question": "Q: 1+2=\n", "gold": "3", "topic": "add"}),
        json.dumps({"id": 17, "question": "Q: 2+2=\n", "gold": "4", "topic": "add"}),
    ])
    ds = load(path, prompt_field="question", answer_field="gold")
    assert [r.id for r in ds] == ["qa-0", "17"]
    assert ds[0].prompt == "Q: 1+2=\n" and ds[0].columns == {"answer": "3", "topic": "add"}
    assert collate_columns(ds.records) == {"answer": ["3", "4"], "topic": ["add", "add"]}


def test_parquet_with_prompt_ids(tmp_path, load):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "ids.parquet"
    pd.DataFrame({
        "id": ["a", "b"],
        "prompt_ids": [[1, 25, 24], [1, 5]],
        "answer": ["7", "8"],
        "weight": [0.5, 1.5],
    }).to_parquet(path)
    ds = load(path)
    assert [r.prompt_ids for r in ds] == [[1, 25, 24], [1, 5]]
    assert ds[0].prompt is None and ds[1].columns == {"answer": "8", "weight": 1.5}


@pytest.mark.parametrize(
    "lines, where, problem",
    [
        (['{"prompt": "a"}', '{"prompt": "b"}', '{"answer": "3"}'], "line 3 (row 2)", "missing field 'prompt'"),
        (['{"prompt": "a"}', '{"prompt": 5}'], "line 2", "must be a string, got int"),
        (['{"prompt": "a"}', '{"prompt": "   "}'], "line 2 (row 1)", "empty prompt"),
        (['{"prompt": "a"}', "", '{"prompt": ""}'], "line 3 (row 1)", "empty prompt"),  # blank lines count
        (['{"prompt": "a"}', "{not json"], "line 2", "invalid JSON"),
        (['{"prompt": "a"}', "[1, 2]"], "line 2", "must be a JSON object"),
        (['{"prompt_ids": [1, 2]}', '{"prompt_ids": []}'], "line 2 (row 1)", "'prompt_ids' must be a non-empty list"),
        (['{"id": "x", "prompt": "a"}', '{"id": "x", "prompt": "b"}'], "line 2 (row 1)", "duplicate id 'x'"),
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": 2}'], "line 2", "column 'answer' is int here"),
        (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", "answer": 2}'], "line 3", "column 'answer' is int"),
    ],
)
def test_malformed_jsonl_rows_name_file_and_line(tmp_path, load, lines, where, problem):
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load(path)
    text = str(info.value)
    assert str(path) in text and where in text and problem in text, text


def test_malformed_parquet_row_and_schema_errors(tmp_path, load):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt": ["ok", ""]}).to_parquet(path)
    with pytest.raises(DataError, match=r"bad.parquet: row 1: empty prompt"):
        load(path)
    pd.DataFrame({"prompt": ["ok"], "completions": ["x"]}).to_parquet(path)
    with pytest.raises(DataError, match="clash with reward-function arguments"):
        load(path)
    pd.DataFrame({"text": ["ok"]}).to_parquet(path)
    with pytest.raises(DataError, match="no 'prompt' or 'prompt_ids' column"):
        load(path)


def test_missing_file_and_unknown_format(tmp_path, load):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("prompt\nhi\n")
    with pytest.raises(DataError, match="unknown dataset format '.csv'"):
        load(tmp_path / "data.csv")


def test_package_imports_without_datasets_or_transformers(tmp_path):
    code = (
        "import sys; sys.modules['datasets'] = None; sys.modules['transformers'] = None\n"
        "import respec.tasks as t\n"
        "try:\n"
        f"    t.load_prompts({str(tmp_path / 'x.jsonl')!r})\n"
        "except t.DataError as e:\n"
        "    print(e)\n"
    )
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "needs the `datasets` package" in out.stdout
