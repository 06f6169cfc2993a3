"""The one module that loads transformers models and tokenizers from a local checkpoint.

Always local files only, safetensors only and never remote code (``trust_remote_code=False``): a checkpoint
is untrusted input. Loading failures become the project's errors (:class:`~converters.errors.UnsupportedModel`
for a model, :class:`~converters.errors.InputError` for a tokenizer), with the loader's own exception as
``__cause__``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from converters.errors import InputError, UnsupportedModel

log = logging.getLogger(__name__)

CPU = "cpu"
CUDA = "cuda"


def default_device() -> str:
    """``cuda`` when a GPU is visible to torch, else ``cpu``."""
    import torch

    return CUDA if torch.cuda.is_available() else CPU


def pick_dtype(device: str, *, parameters: int | None = None, f32_max_params: int | None = None) -> Any:
    """bfloat16 on a GPU or above ``f32_max_params`` parameters (to fit in memory), float32 otherwise (exact)."""
    import torch

    big = parameters is not None and f32_max_params is not None and parameters > f32_max_params
    return torch.bfloat16 if big or device.startswith(CUDA) else torch.float32


def dtype_name(dtype: Any) -> str:
    """``float32``, ``bfloat16``... (torch's name without the module)."""
    return str(dtype).replace("torch.", "")


def load_causal_lm(checkpoint: Path, dtype: Any = None, device: str = CPU) -> Any:
    """A causal LM from a local checkpoint (float32 unless ``dtype`` is given), moved to ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True,
            local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the model cannot be loaded here
        raise UnsupportedModel(f"transformers cannot load {checkpoint}: {e}") from e
    return model.to(device)


def load_tokenizer(checkpoint: Path) -> Any:
    """The tokenizer of a local checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a missing input
        raise InputError(f"cannot load the source tokenizer from {checkpoint}: {e}") from e


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (no-op for None)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
