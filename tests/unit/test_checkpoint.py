"""Bad checkpoints give one clear reason each; nothing here loads weights or runs model code."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from converters.formats import checkpoint as ck
from converters.core.errors import InputError, UnsupportedModel

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}


def make(tmp: Path, *, config=CONFIG, weights=True, tokenizer=True, extra=None) -> Path:
    d = tmp / "model"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        save_file({"w": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.ones(8)}, str(d / "model.safetensors"))
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    for name, content in (extra or {}).items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def test_good_checkpoint_facts(tmp_path):
    d = make(tmp_path, extra={"README.md": "---\nlicense: apache-2.0\n---\n# x\n"})
    c = ck.inspect(d, supported=frozenset({"LlamaForCausalLM"}))
    assert c.architecture == "LlamaForCausalLM" and c.parameters == 4 * 8 + 8
    assert c.dtypes == ("BF16", "F32") and c.has_chat_template and c.license == "apache-2.0"
    assert c.tokenizer_files == ("tokenizer.json",)
    fp = c.fingerprint()
    assert [f["name"] for f in fp["files"]] == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-7])


def _bad_header(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 64)


CASES = [
    ("no config", dict(config=None), None, UnsupportedModel, "no config.json"),
    ("malformed config", dict(config="{not json"), None, UnsupportedModel, "malformed config.json"),
    ("no architectures", dict(config={"model_type": "llama"}), None, UnsupportedModel, "architectures"),
    ("remote code", dict(config={**CONFIG, "auto_map": {"AutoModel": "m.M"}}), None, UnsupportedModel, "trust_remote_code"),
    ("pickle only", dict(weights=False, extra={"pytorch_model.bin": b"\x80\x04"}), None, UnsupportedModel, "pickle"),
    ("no weights", dict(weights=False), None, UnsupportedModel, "no safetensors"),
    ("truncated safetensors", {}, _truncate, InputError, "corrupt safetensors"),
    ("garbage header", {}, _bad_header, InputError, "corrupt safetensors"),
    ("no tokenizer", dict(tokenizer=False), None, UnsupportedModel, "no tokenizer"),
    ("unsupported architecture", dict(config={**CONFIG, "architectures": ["FancyNetForCausalLM"]}), None,
     UnsupportedModel, "FancyNetForCausalLM is not supported"),
]


@pytest.mark.parametrize("name,kwargs,damage,err,text", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoints(tmp_path, name, kwargs, damage, err, text):
    d = make(tmp_path, **kwargs)
    if damage:
        damage(d)
    with pytest.raises(err) as ei:
        ck.inspect(d, supported=frozenset({"LlamaForCausalLM"}))
    msg = str(ei.value)
    assert text in msg and "\n" not in msg


def test_remote_code_has_no_switch(tmp_path):
    import inspect

    assert "allow_remote_code" not in inspect.signature(ck.inspect).parameters
    d = make(tmp_path, config={**CONFIG, "auto_map": {"AutoModel": "m.M"}})
    with pytest.raises(UnsupportedModel, match="never run"):
        ck.inspect(d)


def test_shard_index_with_missing_file(tmp_path):
    d = make(tmp_path, extra={"model.safetensors.index.json": json.dumps({"weight_map": {"x": "model-00002.safetensors"}})})
    with pytest.raises(InputError, match="missing files"):
        ck.inspect(d)


def crafted(header: object, data: bytes = b"\0" * 64, length: int | None = None) -> bytes:
    """A safetensors file with this JSON header (and a header length that may lie)."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _entry(**kw):
    return {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64], **kw}


HEADERS = [
    ("shape not a list", crafted({"w": _entry(shape="4x4")}), "shape of 'w' is not a list"),
    ("shape with a negative size", crafted({"w": _entry(shape=[-4, -4])}), "shape of 'w' is not a list"),
    ("shape of strings", crafted({"w": _entry(shape=["4", "4"])}), "shape of 'w' is not a list"),
    ("dtype a list", crafted({"w": _entry(dtype=["F32"])}), "unknown dtype ['F32']"),
    ("dtype an object", crafted({"w": _entry(dtype={"a": 1})}), "unknown dtype"),
    ("negative offsets", crafted({"w": _entry(data_offsets=[-64, 0])}), "lies outside the file"),
    ("offsets not integers", crafted({"w": _entry(data_offsets=[0.0, 64.0])}), "are not two integers"),
    ("offsets a string", crafted({"w": _entry(data_offsets="0-64")}), "are not two integers"),
    ("overlapping tensors", crafted({"a": _entry(shape=[8], data_offsets=[0, 32]),
                                     "b": _entry(shape=[8], data_offsets=[16, 48]),
                                     "c": _entry(shape=[4], data_offsets=[48, 64])}), "two tensors overlap"),
    ("header length past the end", crafted({"w": _entry()}, length=10**9), "does not fit the file"),
    ("entry not an object", crafted({"w": [1, 2]}), "is not an object"),
    ("nesting bomb", crafted(b"[" * 100000 + b"]" * 100000), "header is not JSON"),
    ("header not an object", crafted([1, 2]), "header is not an object"),
]


@pytest.mark.parametrize("name,content,words", HEADERS, ids=[h[0] for h in HEADERS])
def test_a_crafted_safetensors_header_is_one_clear_error(tmp_path, name, content, words):
    d = make(tmp_path, weights=False, extra={"model.safetensors": content})
    with pytest.raises(InputError) as ei:
        ck.inspect(d)
    msg = str(ei.value)
    assert msg.startswith("corrupt safetensors model.safetensors: ") and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("target,words", [
    ("../outside.safetensors", "unsafe files"), ("/etc/passwd", "unsafe files"), ("a\\..\\b", "unsafe files"),
    (["model.safetensors"], "unsafe files"), ("link.safetensors", "outside the checkpoint"),
])
def test_weight_map_entries_are_checked_like_downloaded_names(tmp_path, target, words):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"secret")
    d = make(tmp_path, extra={"model.safetensors.index.json": json.dumps({"weight_map": {"w": target}})})
    (d / "link.safetensors").symlink_to(outside)
    (d / "link.safetensors").unlink() if target != "link.safetensors" else None
    with pytest.raises(UnsupportedModel) as ei:
        ck.inspect(d)
    assert words in str(ei.value) and "\n" not in str(ei.value)


def test_a_weight_map_inside_the_checkpoint_passes(tmp_path):
    d = make(tmp_path, extra={"model.safetensors.index.json": json.dumps({"weight_map": {"w": "model.safetensors",
                                                                                        "b": "./model.safetensors"}})})
    assert ck.inspect(d).parameters == 40


def test_supported_architectures_read_from_converter_source(tmp_path):
    conv = tmp_path / "conversion"
    conv.mkdir()
    (conv / "__init__.py").write_text('TEXT_MODEL_MAP: dict[str, str] = {\n  "LlamaForCausalLM": "llama",\n  "Qwen2ForCausalLM": "qwen"}\n')
    assert ck.supported_architectures(tmp_path) == {"LlamaForCausalLM", "Qwen2ForCausalLM"}


REFUSALS = [
    # (file names, weights refusal, its reason): the rules inspect applies to a folder and bot.model.rules to a Hub record
    (["model.safetensors", "pytorch_model.bin"], None, None),
    (["config.json", "pytorch_model.bin", "extra.PT"], ck.Refusal("pickle_only", ("pytorch_model.bin", "extra.PT")),
     "only pickle weights (extra.PT, pytorch_model.bin); refused: pickle can run code"),
    (["config.json", "README.md"], ck.Refusal("no_safetensors"), "no safetensors weights"),
    ([], ck.Refusal("no_safetensors"), "no safetensors weights"),
]


@pytest.mark.parametrize("names,refusal,reason", REFUSALS)
def test_weights_refusal(names, refusal, reason):
    got = ck.weights_refusal(names)
    assert got == refusal
    assert (got.reason() if got else None) == reason


@pytest.mark.parametrize("config,keys", [
    ({}, None), ({"auto_map": {}}, None), ({"auto_map": {"B": "x.B", "A": "x.A"}}, ("A", "B")),
    ({"auto_map": ["x.A"]}, ()), ("not a mapping", None),
])
def test_remote_code_refusal(config, keys):
    got = ck.remote_code_refusal(config)
    assert (got.names if got else None) == keys
    if got:
        assert got.code == "remote_code"
        assert got.reason("tokenizer_config.json") == \
            "needs trust_remote_code (tokenizer_config.json has auto_map); refused: remote code is never run"


@pytest.mark.parametrize("name,result", [
    ("config.json", True), ("sub/model-00001-of-00002.safetensors", True), ("README.md", False),
    ("tokenizer.model", True), ("Config.json", False), ("chat_template.jinja", True), ("x.bin", False),
])
def test_is_result_file(name, result):
    assert ck.is_result_file(name) is result


def test_a_hugging_face_cache_snapshot_with_a_shard_index_is_accepted(tmp_path):
    """A snapshot of the Hub cache links its files to ``../../blobs``: that is inside the repo's cache folder."""
    src = make(tmp_path, extra={"model.safetensors.index.json": json.dumps({"weight_map": {"w": "model.safetensors",
                                                                                          "b": "model.safetensors"}})})
    repo = tmp_path / "hub" / "models--acme--Tiny"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        blob = blobs / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    assert ck.inspect(snap).parameters == 40
    # a link out of the repo's cache folder is still refused
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(UnsupportedModel, match="outside the checkpoint"):
        ck.inspect(snap)


# --------------------------------------------------------------------------------------------------
# Exactly as strict as the official loader (issue 19): every crafted header below is also given to safetensors'
# own loader, and inspect must accept exactly what it accepts.
# --------------------------------------------------------------------------------------------------

def _t(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


F32x2 = _t("F32", [2], 0, 8)
OFFICIAL = [
    # (name, header, data length, words of our refusal or None when both loaders accept it)
    ("F4 packs two elements a byte", {"w": _t("F4", [4, 4], 0, 8)}, 8, None),
    ("F6 packs four elements in three bytes", {"w": _t("F6_E2M3", [4], 0, 3), "v": _t("F6_E3M2", [8], 3, 9)}, 9, None),
    ("F4 huge shape in 8 bytes", {"w": _t("F4", [10**15], 0, 8)}, 8, "size does not match its shape"),
    ("F6 huge shape in 8 bytes", {"w": _t("F6_E2M3", [10**6, 10**6], 0, 6)}, 6, "size does not match its shape"),
    ("F4 odd count rounded up", {"w": _t("F4", [3], 0, 2)}, 2, "byte boundary"),
    ("F6 count not a multiple of 4", {"w": _t("F6_E3M2", [3], 0, 3)}, 3, "byte boundary"),
    ("F4 scalar", {"w": _t("F4", [], 0, 1)}, 1, "byte boundary"),
    ("dtypes the loader knows", {"c": _t("C64", [1], 0, 8), "f": _t("F8_E4M3FNUZ", [2], 8, 10),
                                 "g": _t("F8_E5M2FNUZ", [2], 10, 12), "e": _t("F8_E8M0", [4], 12, 16)}, 16, None),
    ("a dtype it does not know", {"w": _t("E8M0", [8], 0, 8)}, 8, "unknown dtype 'E8M0'"),
    ("a gap between tensors", {"a": F32x2, "b": _t("F32", [2], 16, 24)}, 24, "bytes 8..16 belong to no tensor"),
    ("data not starting at 0", {"a": _t("F32", [2], 8, 16)}, 16, "bytes 0..8 belong to no tensor"),
    ("zero-size tensors anywhere", {"z0": _t("F32", [0], 0, 0), "a": F32x2, "z": _t("BF16", [4, 0], 8, 8)}, 8, None),
    ("shape overflows before a zero", {"w": _t("F32", [2**40, 2**40, 0], 0, 0)}, 0, "overflows"),
    ("a zero before a huge dimension", {"w": _t("F32", [0, 2**40, 2**40], 0, 0)}, 0, None),
    ("no tensors at all", {}, 0, None),
    ("__metadata__ a string map", {"__metadata__": {"format": "pt"}, "a": F32x2}, 8, None),
    ("__metadata__ null", {"__metadata__": None, "a": F32x2}, 8, None),
    ("__metadata__ with a number", {"__metadata__": {"format": 1}, "a": F32x2}, 8, "__metadata__ is not a map of strings"),
    ("__metadata__ with null", {"__metadata__": {"format": None}, "a": F32x2}, 8, "__metadata__ is not a map of strings"),
    ("__metadata__ nested", {"__metadata__": {"x": {"y": "z"}}, "a": F32x2}, 8, "__metadata__ is not a map of strings"),
    ("__metadata__ a list", {"__metadata__": ["pt"], "a": F32x2}, 8, "__metadata__ is not a map of strings"),
    ("__metadata__ a string", {"__metadata__": "pt", "a": F32x2}, 8, "__metadata__ is not a map of strings"),
]


def _official_loads(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            list(f.keys())
    except SafetensorError:
        return False
    return True


@pytest.mark.parametrize("name,header,n,words", OFFICIAL, ids=[c[0] for c in OFFICIAL])
def test_inspect_accepts_exactly_what_the_official_loader_accepts(tmp_path, name, header, n, words):
    d = make(tmp_path, weights=False, extra={"model.safetensors": crafted(header, b"\0" * n)})
    assert _official_loads(d / "model.safetensors") is (words is None)  # the case says what safetensors does
    if words is None:
        ck.inspect(d)
        return
    with pytest.raises(InputError) as ei:
        ck.inspect(d)
    msg = str(ei.value)
    assert msg.startswith("corrupt safetensors model.safetensors: ") and words in msg and "\n" not in msg, msg


def test_sub_byte_tensors_count_their_elements_as_parameters(tmp_path):
    d = make(tmp_path, weights=False, extra={"model.safetensors": crafted({"w": _t("F4", [4, 4], 0, 8)}, b"\0" * 8)})
    c = ck.inspect(d)
    assert (c.parameters, c.dtypes) == (16, ("F4",))


@pytest.mark.parametrize("front,license", [
    ("license: apache-2.0", "apache-2.0"), ("license: 'llama3.1'", "llama3.1"), ('license: "cc-by-nc-4.0"', "cc-by-nc-4.0"),
    ("license: other\nlicense_name: x", "other"), ("language: en", None), ("license: openrail++", "openrail++"),
    ("license: mit  # the code too", "mit"), ("language: en\r\nlicense: mit\r\ntags: [a]\r", "mit"),  # CRLF
    ("license:\n  - mit\n  - apache-2.0", None),  # a YAML list: not one licence id (the Hub's card data has it)
    ("license: {evil: 1}", None), ("license: [mit]", None), ("license: <script>alert(1)</script>", None),
])
def test_the_readme_licence_is_one_licence_id(tmp_path, front, license):
    d = make(tmp_path, extra={"README.md": f"---\n{front}\n---\n# x\n"})
    assert ck.inspect(d).license == license


def test_named_templates_beside_chat_template_jinja_are_result_files(tmp_path: Path) -> None:
    """The pinned converter writes ``additional_chat_templates/<name>.jinja`` as ``tokenizer.chat_template.<name>``:
    the fetch downloads them (so inspect renders them in the sandbox), the watcher re-queues on their change and the
    stage records fingerprint them."""
    from converters.formats.checkpoint import files_fingerprint, is_result_file

    assert is_result_file("additional_chat_templates/tool_use.jinja")
    assert not is_result_file("other_folder/tool_use.jinja") and not is_result_file("tool_use.jinja")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    names = [f["name"] for f in files_fingerprint(tmp_path) or []]
    assert names == ["config.json", "additional_chat_templates/tool_use.jinja"]
