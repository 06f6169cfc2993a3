"""converters.formats.gguf_meta: the same values as gguf-py's own reader, keys from gguf.Keys, file types from gguf-py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from converters.formats import gguf_meta
from converters.core import quants
from converters.core.errors import InputError

TOKENS = ["<s>", "</s>", "hello", " wörld", "日本", "🦙", ""]


def _write(path: Path, *, arch: str = "llama", template: str | None = "{{ messages }}", head_dim: bool = True) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(4)
    w.add_context_length(2048)
    w.add_embedding_length(256)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    if head_dim:
        w.add_key_length(48)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.5, -1.25, 0.0, 1e-3, 2.0, -3.5, 0.0])
    w.add_token_types([3, 3, 1, 1, 1, 1, 1])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    w.add_file_type(gguf_meta.file_type("Q8_0"))
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((7, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return _write(tmp_path / "small.gguf")


def test_values_equal_the_stock_reader(small: Path) -> None:
    stock = gguf.GGUFReader(str(small))
    expected = {k: f.contents() for k, f in stock.fields.items() if not k.startswith("GGUF.")}
    meta = gguf_meta.read(small)
    assert dict(meta.values) == expected
    assert list(meta.values) == list(expected)  # file order kept
    assert meta.data_offset == stock.data_offset == gguf_meta.data_offset(small)
    assert meta.tensor_count == len(stock.tensors) == 1


def test_read_again_whenever_the_file_changed(tmp_path: Path) -> None:
    """The metadata cache: the same file unchanged is not parsed again; a rewrite in place, a replacement under the
    same name, or a write that restores the old modification time each give the new file's metadata."""
    import os

    p = _write(tmp_path / "m.gguf", template="{{ one }}")
    first = gguf_meta.read(p)
    assert gguf_meta.read(p) is first  # unchanged: the cached object
    with pytest.raises(TypeError):
        first.values["general.architecture"] = "x"  # type: ignore[index]  # read-only: a cached object is shared
    st = p.stat()
    _write(tmp_path / "m.gguf", template="{{ two }}")  # rewritten in place, same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    assert gguf_meta.read(p).chat_templates() == {gguf.Keys.Tokenizer.CHAT_TEMPLATE: "{{ two }}"}
    other = _write(tmp_path / "n.gguf", template="{{ three }}")
    os.replace(other, p)
    assert gguf_meta.read(p).chat_templates() == {gguf.Keys.Tokenizer.CHAT_TEMPLATE: "{{ three }}"}
    link = tmp_path / "link.gguf"
    os.link(p, link)  # the same file by another name: the name it was asked by
    assert gguf_meta.read(link).path == link
    p.unlink()
    link.unlink()
    with pytest.raises(InputError):
        gguf_meta.read(p)


@pytest.mark.parametrize(("key", "expected"), [
    (gguf.Keys.General.ARCHITECTURE, "llama"),
    (gguf.Keys.Tokenizer.LIST, TOKENS),
    (gguf.Keys.Tokenizer.PRE, "smollm"),
    (gguf.Keys.Tokenizer.BOS_ID, 0),
    (gguf.Keys.Tokenizer.ADD_BOS, False),
    (gguf.Keys.Tokenizer.CHAT_TEMPLATE, "{{ messages }}"),
    (gguf.Keys.General.FILE_TYPE, 7),
    ("llama.rope.freq_base", 10000.0),
])
def test_values_are_plain_python(small: Path, key: str, expected: object) -> None:
    v = gguf_meta.read(small).get(key)
    assert v == expected and type(v) is type(expected)


@pytest.mark.parametrize(("head_dim", "shapes"), [
    (True, {"n_layer": 4, "n_kv_heads": 2, "head_dim": 48, "n_ctx_train": 2048}),
    (False, {"n_layer": 4, "n_kv_heads": 2, "head_dim": 32, "n_ctx_train": 2048}),  # embedding / heads
])
def test_attention_shapes(tmp_path: Path, head_dim: bool, shapes: dict) -> None:
    meta = gguf_meta.read(_write(tmp_path / "m.gguf", head_dim=head_dim))
    assert meta.attention_shapes() == shapes
    assert meta.arch == "llama" and meta.model_int(gguf.Keys.LLM.BLOCK_COUNT) == 4


def test_compared_keys_are_tokenizer_hyperparameters_and_architecture(small: Path) -> None:
    keys = set(gguf_meta.read(small).tokenizer_and_model_keys())
    assert gguf.Keys.General.ARCHITECTURE in keys and gguf.Keys.Tokenizer.LIST in keys
    assert gguf.Keys.LLM.BLOCK_COUNT.format(arch="llama") in keys
    assert gguf.Keys.General.FILE_TYPE not in keys  # differs between quants by design


def test_invalid_utf8_is_kept_as_surrogates(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.gguf", template="TMPL-XYZ")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"TMPL-XYZ", b"TMPL-\xff\xfeZ"))
    with pytest.raises(UnicodeDecodeError):  # the stock reader gives up on the whole value
        gguf.GGUFReader(str(path)).fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE].contents()
    got = gguf_meta.read(path).get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    assert got == "TMPL-\udcff\udcfeZ"


@pytest.mark.parametrize("content", [b"", b"not a gguf at all", b"GGUF\x01\x00\x00\x00" + b"\x00" * 16])
def test_not_a_gguf_is_an_input_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(InputError):
        gguf_meta.read(p)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        gguf_meta.read(tmp_path / "missing.gguf")


@pytest.mark.parametrize(("qtype", "number"), [("Q8_0", 7), ("Q4_K_M", 15), ("IQ4_XS", 30), ("BF16", 32),
                                                ("F16", 1), ("F32", 0), ("q2_k", 10)])
def test_file_type_from_gguf_py(qtype: str, number: int) -> None:
    assert gguf_meta.file_type(qtype) == number


def test_every_catalogued_type_has_a_file_type() -> None:
    for q in quants.CATALOGUE.values():
        assert gguf_meta.file_type(q.base_name) == int(gguf.LlamaFileType[f"MOSTLY_{q.base_name}"])


def test_unknown_file_type() -> None:
    with pytest.raises(InputError):
        gguf_meta.file_type("Q9_Z")


def _write_tensors(path: Path, tensors: dict) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (arr, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_non_finite_tensors_are_counted_in_every_float_type_and_in_quants(tmp_path: Path) -> None:
    T = gguf.GGMLQuantizationType
    rows = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
    f32 = rows.copy()
    f32[0, :3] = [np.nan, np.inf, -np.inf]
    f16 = rows.astype(np.float16)
    f16[2, 5] = np.nan
    bf16_bad = rows.copy()
    bf16_bad[1, :2] = [np.nan, np.inf]
    q8_bad = rows.copy()
    q8_bad[3, 7] = np.nan
    path = _write_tensors(tmp_path / "m.gguf", {
        "a.weight": (f32, None),
        "b.weight": (f16, None),
        "c.weight": (bf16_bad, T.BF16),
        "d.weight": (rows, T.BF16),  # finite: not listed
        "e.weight": (q8_bad, T.Q8_0),
        "f.weight": (rows, T.Q8_0),
    })
    found = dict(gguf_meta.non_finite_tensors(path, chunk_bytes=64))  # small slices: the slicing is counted right
    assert set(found) == {"a.weight", "b.weight", "c.weight", "e.weight"}, found
    assert (found["a.weight"], found["b.weight"], found["c.weight"]) == (3, 1, 2)
    assert found["e.weight"] >= 1  # a NaN makes its Q8_0 block's scale NaN: the block's values are all lost
    clean = _write_tensors(tmp_path / "clean.gguf", {"a.weight": (rows, None), "d.weight": (rows, T.BF16)})
    assert gguf_meta.non_finite_tensors(clean) == []


def test_tensors_types_and_dequantized_values(tmp_path: Path) -> None:
    T = gguf.GGMLQuantizationType
    rows = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
    path = _write_tensors(tmp_path / "m.gguf", {"a.weight": (rows, None), "e.weight": (rows, T.Q8_0)})
    assert gguf_meta.tensor_types(path) == {"a.weight": "F32", "e.weight": "Q8_0"}
    by_name = {t.name: t for t in gguf_meta.tensors(path)}
    assert [int(x) for x in by_name["e.weight"].shape] == [64, 4]  # ggml order
    assert np.array_equal(np.asarray(gguf_meta.dequantize(by_name["a.weight"])).reshape(4, 64), rows)
    q8 = np.asarray(gguf_meta.dequantize(by_name["e.weight"])).reshape(4, 64)
    assert np.allclose(q8, rows, atol=0.01)
    # the same tensors as the stock reader's (gguf_meta reads them with plain views, for speed)
    stock = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, t in by_name.items():
        s = stock[name]
        assert (t.tensor_type, list(t.shape), int(t.n_bytes), int(t.data_offset)) == \
            (s.tensor_type, list(s.shape), int(s.n_bytes), int(s.data_offset))
        assert np.array_equal(np.asarray(t.data), np.asarray(s.data))


def test_quant_sizes_are_gguf_py_block_sizes() -> None:
    sizes = gguf_meta.quant_sizes()
    assert sizes["Q4_K"] == (256, 144) and sizes["Q8_0"] == (32, 34) and sizes["F16"] == (1, 2)


def test_write_copy_changes_only_the_given_metadata(small: Path, tmp_path: Path) -> None:
    """Every field but one copied, one added, the tensor infos and data as they were: the layout and data bytes are
    the source's, the metadata is what was asked for."""
    r = gguf_meta.reader(small)
    extra = gguf_meta.reader(_write(tmp_path / "other.gguf", template="{{ other }}"))
    fields = [(n, f) for n, f in r.fields.items()
              if not n.startswith("GGUF.") and n not in (gguf_meta.ARCHITECTURE, gguf_meta.CHAT_TEMPLATE)]
    fields.append((gguf_meta.CHAT_TEMPLATE, extra.fields[gguf_meta.CHAT_TEMPLATE]))
    out = tmp_path / "copy.gguf"
    digest = gguf_meta.write_copy(out, r, fields, small)
    written = gguf_meta.reader(out)
    assert gguf_meta.tensor_layout(written) == gguf_meta.tensor_layout(r)
    src_data = small.read_bytes()[int(r.data_offset):]
    assert out.read_bytes()[int(written.data_offset):] == src_data
    assert digest == hashlib.sha256(src_data).hexdigest()
    old, new = gguf_meta.read(small).values, gguf_meta.read(out).values
    assert new[gguf_meta.CHAT_TEMPLATE] == "{{ other }}"
    assert {k: v for k, v in new.items() if k != gguf_meta.CHAT_TEMPLATE} == \
        {k: v for k, v in old.items() if k != gguf_meta.CHAT_TEMPLATE}


@pytest.mark.parametrize("types, why", [
    ([gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING], "empty array"),
    ([gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32], "nested array"),
])
def test_write_copy_refuses_what_gguf_py_cannot_write(small: Path, tmp_path: Path, types: list, why: str) -> None:
    field = SimpleNamespace(name="tokenizer.ggml.merges", types=types, data=[], parts=[])
    with pytest.raises(gguf_meta.Unwritable, match=f"metadata key tokenizer.ggml.merges is an? {why}"):
        gguf_meta.write_copy(tmp_path / "out.gguf", gguf_meta.reader(small), [(field.name, field)], small)
