import json

import pytest

from converters import records


def test_atomic_output_renames_on_success(tmp_path):
    final = tmp_path / "a.gguf"
    with records.atomic_output(final) as tmp:
        assert tmp.name == "a.gguf" and tmp.parent != tmp_path  # written in a scratch folder
        tmp.write_bytes(b"x" * 10)
        assert not final.exists()
    assert final.read_bytes() == b"x" * 10
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "a.gguf"
    with pytest.raises(RuntimeError):
        with records.atomic_output(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_remove_partials_cleans_scratch_left_by_a_killed_process(tmp_path):
    scratch = tmp_path / ".partial-999-1"
    scratch.mkdir()
    (scratch / "b.gguf").write_bytes(b"half")
    (tmp_path / "done.gguf").write_bytes(b"ok")
    removed = records.remove_partials(tmp_path)
    assert removed and not scratch.exists() and (tmp_path / "done.gguf").exists()


def test_complete_requires_same_inputs_and_intact_outputs(tmp_path):
    out = tmp_path / "f.bin"
    out.write_bytes(b"12345")
    records.save(tmp_path, "stage", {"a": 1}, [out], 1.5, "v1")
    assert records.complete(tmp_path, "stage", {"a": 1}) is not None
    assert records.complete(tmp_path, "stage", {"a": 2}) is None  # other inputs
    out.write_bytes(b"123")  # truncated output
    assert records.complete(tmp_path, "stage", {"a": 1}) is None
    out.write_bytes(b"54321")  # same size, other content: the content hash sees it
    assert records.complete(tmp_path, "stage", {"a": 1}) is None
    data = json.loads(records.record_path(tmp_path, "stage").read_text())
    import hashlib
    assert data["outputs"][0]["sha256"] == hashlib.sha256(b"12345").hexdigest()
    assert data["tool_version"] == "v1" and data["seconds"] == 1.5


def test_corrupt_record_counts_as_missing(tmp_path):
    p = records.record_path(tmp_path, "x")
    p.parent.mkdir()
    p.write_text("{not json")
    assert records.load(tmp_path, "x") is None
