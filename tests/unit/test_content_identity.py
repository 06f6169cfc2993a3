"""Resume keys on content, not size: full sha256 identities, cached by size + mtime + inode; and the pure rule
deciding whether a Hub repo is this model's (bot.publish.target.foreign_reason)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bot.publish.target import Identity, RemoteRepo, TargetPolicy, foreign_reason
from converters.formats import checkpoint
from converters.core import records
from converters.core.errors import ConfigError

BIG = 70 << 20  # larger than the old 64 MB limit above which only the head and tail were hashed


def _sparse(path: Path, size: int = BIG) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _poke_middle(path: Path) -> None:
    """One byte in the middle changed in place: same size, same inode, a later mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\x01")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))


def test_a_same_size_change_in_the_middle_of_a_large_file_changes_its_identity(tmp_path: Path) -> None:
    f = _sparse(tmp_path / "model.safetensors")
    before = records.fingerprint_file(f, tmp_path)
    _poke_middle(f)
    after = records.fingerprint_file(f, tmp_path)
    assert before["size"] == after["size"] and before["sha256"] != after["sha256"]
    assert after["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_new_revision_of_the_same_size_is_another_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "source"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    weights = _sparse(ckpt / "model.safetensors")
    first = checkpoint.files_fingerprint(ckpt, tmp_path)
    _poke_middle(weights)
    assert checkpoint.files_fingerprint(ckpt, tmp_path) != first


def test_hashes_are_reused_while_size_mtime_and_inode_are_unchanged(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "q.gguf"
    f.write_bytes(b"GGUF" * 1000)
    reads = []
    real = records.sha256_file
    monkeypatch.setattr(records, "sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    sha = records.content_sha256(f, tmp_path)
    assert records.content_sha256(f, tmp_path) == sha and len(reads) == 1
    records.forget_memory_hashes()  # a new process: the work dir's cache file answers
    assert records.content_sha256(f, tmp_path) == sha and len(reads) == 1
    assert (tmp_path / "records" / records.HASH_CACHE_FILE).is_file()
    f.write_bytes(b"GGUF" * 999 + b"FUGG")  # same size, rewritten: read again
    assert records.content_sha256(f, tmp_path) != sha and len(reads) == 2
    other = tmp_path / "other.gguf"
    other.write_bytes(f.read_bytes())
    os.replace(other, f)  # another file (inode) under the same name: read again
    records.content_sha256(f, tmp_path)
    assert len(reads) == 3


def test_a_recorded_output_changed_in_place_is_not_complete(tmp_path: Path) -> None:
    out = _sparse(tmp_path / "ref.gguf", 1 << 20)
    records.save(tmp_path, "convert", {"x": 1}, [out], 1.0, "v")
    assert records.complete(tmp_path, "convert", {"x": 1}) is not None
    _poke_middle(out)
    assert records.complete(tmp_path, "convert", {"x": 1}) is None


# ------------------------------------------------------------------------------ whose repo is it
A, B = "acme/Tiny", "other/Tiny"
OURS = Identity(A, "Tiny")
MARKED = {"tags": ["gguf", "ggufbot"], "base_model": A, "base_model_relation": "quantized"}


def _repo(card=None, report=None, files=("README.md",)) -> RemoteRepo:
    return RemoteRepo("ns/Tiny-GGUF", True, "0" * 40, tuple(files), {}, dict(card or {}), report)


@pytest.mark.parametrize("remote, adopted, created, expect", [
    (RemoteRepo("ns/Tiny-GGUF", False), False, False, None),  # does not exist yet
    (_repo(MARKED), False, False, None),  # ours: marker and source
    (_repo({**MARKED, "base_model": "ACME/tiny"}), False, False, None),  # repo ids compare case-insensitively
    (_repo({**MARKED, "base_model": B}), False, False, f"it holds GGUFs of {B}, not of {A}"),
    (_repo({**MARKED, "base_model": B}), True, False, f"it holds GGUFs of {B}"),  # adoption never waives the source
    (_repo({"base_model": A}), False, False, "not made by ggufbot"),
    (_repo({"base_model": A}), True, False, None),  # adopted
    (_repo({}, files=(".gitattributes",)), False, True, None),  # empty, created by this work dir
    (_repo({}, files=(".gitattributes",)), False, False, "not made by ggufbot"),  # empty, someone else's
    (_repo({}, {"publication": {"schema": 1}, "source": {"repo": A}}), False, False, None),  # before the marker
    (_repo({}, {"publication": {"schema": 1}, "source": {"repo": B}}), False, False, f"GGUFs of {B}"),
    (_repo({**MARKED, "base_model_relation": "finetune"}), False, False, "a pruned variant of that source"),
    (_repo({"tags": ["ggufbot"]}, {"model_name": "Tiny", "source": {"repo": None}}), False, False,
     "local checkpoint named 'Tiny'"),
])
def test_foreign_reason(remote: RemoteRepo, adopted: bool, created: bool, expect: str | None) -> None:
    why = foreign_reason(remote, OURS, adopted=adopted, created_here=created)
    assert why is None if expect is None else (why is not None and expect in why), why


def test_a_local_checkpoints_repo_is_its_own_by_model_name() -> None:
    local = Identity(None, "Tiny")
    remote = _repo({"tags": ["ggufbot"]}, {"model_name": "Tiny", "source": {"repo": None}})
    assert foreign_reason(remote, local, adopted=False, created_here=False) is None
    assert "GGUFs of acme/Tiny" in foreign_reason(_repo(MARKED), local, adopted=False, created_here=False)


def test_policy_values_are_checked() -> None:
    assert TargetPolicy(adopt=("Org/Repo",)).adopts("org/repo")
    with pytest.raises(ConfigError):
        TargetPolicy(on_collision="overwrite")
