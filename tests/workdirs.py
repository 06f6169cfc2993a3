"""Work directories for publishing tests: placeholder GGUF bytes plus ladder.json / report.json.

Publishing does not interpret GGUF contents, so the quants here are small byte strings; ladder.json and
report.json are written through ``converters.core.workdir.WorkDir`` from the typed records, like the pipeline and
the evaluation write them. The figures are inputs to the card, not measurements.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from converters.core.report import FAILED, PASSED, Check, FileResult, SERIES, KldStats, Report, TextInfo
from converters.core.workdir import Ladder, WorkDir

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
          "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64,
          "max_position_embeddings": 8192}


def checkpoint_dir(root: Path, *, chat_template: str | None = CHATML, config: Mapping[str, Any] = CONFIG) -> Path:
    d = root / "checkpoint"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    tok: dict[str, Any] = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if chat_template is not None:
        (d / "chat_template.jinja").write_text(chat_template)
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return d


def make_workdir(root: Path, *, model: str = "Tiny-Instruct", source_repo: str | None = "acme/Tiny-Instruct",
                 revision: str = "a" * 40, toolchain: str = "llama.cpp b9999 (test)",
                 types: Iterable[str] = ("Q8_0", "Q4_K_M", "Q2_K"), failed: Iterable[str] = (),
                 split: Iterable[str] = (), publishable: bool = True, imatrix: bool = True, chart: bool = True,
                 seed: str = "", chat_template: str | None = CHATML, license: str | None = "apache-2.0") -> Path:
    """Write a finished work directory under ``root`` and return it. ``seed`` changes the file bytes."""
    wd = root / "work"
    wd.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir(root, chat_template=chat_template)
    failed, split = set(failed), set(split)
    files, rfiles = [], []
    for i, t in enumerate(types):
        payload = b"GGUF" + f"{model}|{t}|{revision}|{toolchain}|{seed}".encode() * (200 * (len(tuple(types)) - i))
        if t in split:
            parts = [f"{model}-{t}/{model}-{t}-0000{k}-of-00002.gguf" for k in (1, 2)]
            half = len(payload) // 2
            chunks = [payload[:half], payload[half:]]
        else:
            parts = [f"{model}-{t}.gguf"]
            chunks = [payload]
        for p, c in zip(parts, chunks):
            (wd / p).parent.mkdir(parents=True, exist_ok=True)
            (wd / p).write_bytes(c)
        first = wd / parts[0]
        files.append({"type": t, "bpw_nominal": 4.0, "needs_imatrix": False, "description": f"{t} test file.",
                      "path": parts[0], "parts": parts, "size": first.stat().st_size,
                      "sha256": hashlib.sha256(first.read_bytes()).hexdigest(),
                      "part_sha256": [hashlib.sha256((wd / p).read_bytes()).hexdigest() for p in parts],
                      "bpw": 4.5, "seconds": 0.1})
        ok = t not in failed
        figures = {k: 0.1 for k in KldStats.__dataclass_fields__ if k not in SERIES}
        figures.update(chunks=4, kld_mean=0.01 * (i + 1), kld_mean_err=0.001, same_top_p=0.95 - 0.05 * i,
                       same_top_p_err=0.002, ppl=10.0 + i, ppl_ratio=1.0 + 0.02 * i)
        rfiles.append(FileResult(type=t, path=parts[0], size=len(payload), bpw=4.5, bpw_nominal=4.0,
                                 stats=KldStats(**figures), checks={"generation": Check.ok("coherent output")},
                                 status=PASSED if ok else FAILED, reasons=[] if ok else ["mean KLD above the gate"]))
    imat = None
    if imatrix:
        (wd / f"{model}-imatrix.gguf").write_bytes(b"GGUF imatrix " + seed.encode())
        (wd / f"{model}-imatrix.dat").write_bytes(b"\0imatrix dat " + seed.encode())
        imat = {"gguf": f"{model}-imatrix.gguf", "dat": f"{model}-imatrix.dat",
                "calibration": {"name": "groups_merged.txt", "source": "hf://datasets/acme/calib/groups_merged.txt",
                                "sha256": "0" * 64, "bytes": 201_000, "chunks": 64, "ctx": 512}}
    if chart:
        (wd / "size-vs-kld.png").write_bytes(b"\x89PNG\r\n\x1a\n" + seed.encode())
    ladder = {"schema_version": 1, "model_name": model,
              "source": {"repo": source_repo, "revision": revision, "path": str(ckpt),
                         "architecture": "LlamaForCausalLM", "parameters": 134515008,
                         "has_chat_template": chat_template is not None, "license": license},
              "toolchain": {"version": toolchain, "commit": None, "cuda": False},
              "reference": {"type": "BF16", "path": f"{model}-BF16.gguf", "size": 0, "sha256": ""},
              "imatrix": imat, "files": files, "seconds": {}}
    checks = {"bf16_vs_source": Check.ok("top-1 agreement 99.8 %") if publishable
              else Check.fail("BF16 conversion disagrees with the source model"),
              "tokenizer": Check.ok("token ids identical on the sample text"),
              "chat_template": Check.skip("no chat template") if chat_template is None else Check.ok("renders")}
    report = Report(model_name=model, source=ladder["source"], toolchain=ladder["toolchain"], tools={},
                    texts={"eval": TextInfo(name="wiki.test.raw", sha256="0" * 64, bytes=1_000_000,
                                            tokens_scored=65_536, chunks=128, ctx=512)},
                    settings={}, reference={"type": "BF16", "ppl": 9.87, "ppl_err": 0.05}, checks=checks,
                    files=rfiles, publishable=publishable,
                    reasons=[] if publishable else ["BF16 conversion disagrees with the source model"],
                    seconds={}, chart="size-vs-kld.png" if chart else None)
    report.file_hashes = WorkDir(wd).content(Ladder.from_json(ladder))  # what the evaluation measured
    if chart:  # and the chart it drew
        png = wd / "size-vs-kld.png"
        report.file_hashes[png.name] = {"size": png.stat().st_size,
                                        "sha256": hashlib.sha256(png.read_bytes()).hexdigest()}
    WorkDir(wd).write_ladder(Ladder.from_json(ladder))
    WorkDir(wd).write_report(report)
    return wd
