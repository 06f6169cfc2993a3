"""The ``-ngl`` rule of converters/llama/gpu.py: the layers that fit, none on a CPU toolchain."""

from __future__ import annotations

from pathlib import Path

import pytest

from converters.llama import gpu
from converters.llama.toolchain import Toolchain

GIB = 1 << 30


@pytest.mark.parametrize("model, blocks, free, want", [
    (16 * GIB, 32, 24 * GIB, 33),  # an 8 B BF16 file on a 24 GB card: all of it, output included
    (16 * GIB, 32, 12 * GIB, 19),  # (12 - 1 - 1.6) GiB / (16/33 GiB per layer) = 19.4
    (16 * GIB, 32, 1 * GIB, 0),  # nothing fits beside the reserve
    (270_000_000, 30, 8 * GIB, 31),
    (1, 0, 8 * GIB, 0),
])
def test_layers_that_fit(model: int, blocks: int, free: int, want: int) -> None:
    assert gpu.layers_that_fit(model, blocks, free) == want


def test_a_cpu_toolchain_gets_no_offload_flag(tmp_path: Path) -> None:
    tc = Toolchain(root=tmp_path, bin_dir=tmp_path, version="v", commit=None, cuda=False, origin="test")
    assert gpu.offload_args(tc, tmp_path / "missing.gguf", free_bytes=8 * GIB) == []
