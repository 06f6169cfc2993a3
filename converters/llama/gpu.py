"""How many of a model's layers a llama.cpp program puts on the GPU (``-ngl``): the layers that fit.

On a CUDA toolchain (``Toolchain.cuda``), llama-imatrix and llama-perplexity get ``-ngl N``; quantize stays on the
CPU (llama-quantize has no GPU path). The rule, :func:`layers_that_fit`:

- a layer weighs ``model bytes / (block_count + 1)``: the repeating blocks, and one more share for the token
  embeddings and the output head (llama.cpp counts the output as the layer after the last block: ``-ngl``
  ``block_count + 1`` puts everything on the GPU);
- what is free on the GPU when the program starts (``nvidia-smi``'s free memory of the first GPU, which the
  pipeline gives to one program at a time), less :data:`RESERVE_BYTES` plus :data:`RESERVE_FRACTION` of the model
  for the KV cache, the logits of a chunk (``n_vocab x ctx`` floats) and the compute buffers;
- ``N = floor(usable / per layer)``, between 0 (all on the CPU) and ``block_count + 1`` (all on the GPU).

A model that does not fit whole runs its first N layers on the GPU and the rest on the CPU (llama.cpp's split), which
is still faster than none; 0 leaves the program as on a CPU-only box.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from converters.core.errors import InputError, ToolError
from converters.formats import gguf_meta
from converters.llama import toolchain as tc_mod

log = logging.getLogger(__name__)

RESERVE_BYTES = 1 << 30  # KV cache, a chunk's logits and compute buffers at ctx 512 with a 256k vocabulary fit in 1 GiB
RESERVE_FRACTION = 0.10  # and a tenth of the model for what grows with it (scratch of the larger matrices)


def layers_that_fit(model_bytes: int, block_count: int, free_bytes: int) -> int:
    """``-ngl`` for a model of ``model_bytes`` with ``block_count`` blocks on a GPU with ``free_bytes`` free."""
    if block_count < 1 or model_bytes <= 0:
        return 0
    per_layer = model_bytes / (block_count + 1)
    usable = free_bytes - RESERVE_BYTES - RESERVE_FRACTION * model_bytes
    return max(0, min(block_count + 1, math.floor(usable / per_layer)))


def offload_args(tc: tc_mod.Toolchain, model: Path, *, free_bytes: int | None = None) -> list[str]:
    """``["-ngl", N]`` for ``model`` on a CUDA toolchain (``free_bytes``: the GPU's free memory, else asked of
    nvidia-smi), ``[]`` otherwise or when the GPU cannot be asked (the program then runs on the CPU as before)."""
    if not tc.cuda:
        return []
    try:
        if free_bytes is None:
            found = tc_mod.gpus()
            if not found:
                return []
            free_bytes = found[0].free_mib << 20
        blocks = gguf_meta.read(model).model_int("{arch}.block_count") or 0
    except (ToolError, InputError, OSError, ValueError) as e:
        log.warning("gpu: cannot size the offload of %s (%s); it runs on the CPU", model.name, e)
        return []
    # a split model's first part names the others (``-00001-of-0000N``): the whole model is what is loaded
    stem = re.sub(r"-00001-of-(\d{5})\.gguf$", r"-*-of-\1.gguf", model.name)
    size = sum(p.stat().st_size for p in model.parent.glob(stem)) if stem != model.name else model.stat().st_size
    n = layers_that_fit(size, blocks, free_bytes)
    log.info("gpu: %s: %d of %d layers on the GPU (%d MiB free)", model.name, n, blocks + 1, free_bytes >> 20)
    return ["-ngl", str(n)]
