"""Hub content for the bot's tests: one acceptable new release and one repo for each reason to skip."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.hubserver import HubServer

SMALL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
FAKE_WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # never downloaded: skipped before any fetch

# repo name -> the decision code the watcher must record for it
EXPECTED_SKIPS = {
    "Gated-1B": "gated",
    "Remote-1B": "remote_code",
    "Pickle-1B": "pickle_only",
    "Packed-1B": "quantized",
    "Huge-70B": "too_large",
    "Escape-1B": "unsafe_filename",
}


def checkpoint_files(path: Path) -> dict[str, Path]:
    """The files of a local checkpoint folder, as the server's ``files`` mapping (README.md left out)."""
    return {p.name: p for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != "README.md"}


def populate(hub: HubServer, author: str, release_name: str, release_files: Mapping[str, Any], *,
             release_config: dict | None = None, release_params: int = 134_515_008) -> dict[str, str]:
    """Add the accepted release and the six repos that must be skipped; return repo id -> expected code."""
    card = {"license": "apache-2.0", "pipeline_tag": "text-generation", "library_name": "transformers"}
    tg = {"pipeline_tag": "text-generation", "library_name": "transformers"}
    small = {"config.json": json.dumps(SMALL_CONFIG), "model.safetensors": FAKE_WEIGHTS, "tokenizer.json": "{}"}
    hub.add_model(f"{author}/{release_name}", dict(release_files), card_data=card, config=release_config or SMALL_CONFIG,
                  safetensors_params=release_params, **tg)
    hub.add_model(f"{author}/Gated-1B", small, card_data=card, gated="manual", config=SMALL_CONFIG,
                  safetensors_params=1_000_000, **tg)
    remote_cfg = {**SMALL_CONFIG, "auto_map": {"AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}}
    hub.add_model(f"{author}/Remote-1B", {**small, "config.json": json.dumps(remote_cfg),
                                          "modeling_remote.py": "import os\n"},
                  card_data=card, config=remote_cfg, safetensors_params=1_000_000, **tg)
    hub.add_model(f"{author}/Pickle-1B", {"config.json": json.dumps(SMALL_CONFIG), "pytorch_model.bin": b"\x80\x04pickle"},
                  card_data=card, config=SMALL_CONFIG, **tg)
    hub.add_model(f"{author}/Packed-1B", {"config.json": json.dumps(SMALL_CONFIG), "packed-Q4_K_M.gguf": b"GGUF\x03"},
                  card_data=card, config=SMALL_CONFIG, **tg)
    hub.add_model(f"{author}/Huge-70B", small, card_data=card, config=SMALL_CONFIG, safetensors_params=70_000_000_000,
                  **tg)
    hub.add_model(f"{author}/Escape-1B", {**small, "../../escape.sh": "#!/bin/sh\n"}, card_data=card,
                  config=SMALL_CONFIG, safetensors_params=1_000_000, **tg)
    return {f"{author}/{k}": v for k, v in EXPECTED_SKIPS.items()}
