import hashlib
import json
import os

import pytest

from converters.core import records


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


def _rewrite_keeping_mtime(path, data: bytes) -> None:
    """Same size, same inode, and the mtime set back to what it was: only the ctime tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_a_same_size_rewrite_with_its_mtime_restored_is_hashed_again(tmp_path):
    f = tmp_path / "q.gguf"
    f.write_bytes(b"GGUF" + b"A" * 4096)
    old = records.content_sha256(f, tmp_path)
    _rewrite_keeping_mtime(f, b"GGUF" + b"B" * 4096)
    new = hashlib.sha256(f.read_bytes()).hexdigest()
    assert records.content_sha256(f, tmp_path) == new != old
    # the work dir's cache file (a new process) does not answer with the old hash either
    _rewrite_keeping_mtime(f, b"GGUF" + b"C" * 4096)
    records.forget_memory_hashes()
    assert records.content_sha256(f, tmp_path) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_cache_row_written_without_the_ctime_is_not_trusted(tmp_path):
    f = tmp_path / "q.gguf"
    f.write_bytes(b"GGUF" + b"A" * 64)
    st = f.stat()
    cache = tmp_path / records.RECORDS_DIR / records.HASH_CACHE_FILE
    cache.parent.mkdir()
    cache.write_text(json.dumps({str(f.absolute()): [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, "0" * 64]}))
    records.forget_memory_hashes()
    assert records.content_sha256(f, tmp_path) == hashlib.sha256(f.read_bytes()).hexdigest()
