"""The one module that loads transformers models and tokenizers from a local checkpoint.

Always local files only, safetensors only and never remote code (``trust_remote_code=False``): a checkpoint
is untrusted input. Loading failures become the project's errors (:class:`~converters.core.errors.UnsupportedModel`
for a model, :class:`~converters.core.errors.InputError` for a tokenizer), with the loader's own exception as
``__cause__``.

:func:`load_tokenizer` loads in a limited, offline child process (:mod:`converters.formats.hfchild`) and returns its
answers; :func:`load_tokenizer_here` and :func:`load_causal_lm` load in the calling process: the children of
:mod:`converters.formats.hfchild` call them, and the variant stages (prune, distill), which train or measure the model
in torch, still do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Any

from converters.core.errors import InputError, UnsupportedModel

log = logging.getLogger(__name__)

CPU = "cpu"
CUDA = "cuda"
# transformers is not thread-safe where the bot runs jobs in threads (limits.concurrency > 1): two first imports at
# once give "ImportError: cannot import name 'AutoTokenizer'", and two ``from_pretrained`` at once swap the global
# patches of its loader so that every later model of the process keeps tensors on the meta device ("Cannot copy out
# of meta tensor"). Imports and loads take this lock; running a loaded model does not.
_LOCK = threading.RLock()


def auto_class(name: str) -> Any:
    """``transformers.<name>`` (``AutoModelForCausalLM``, ``AutoTokenizer``), imported one thread at a time."""
    with _LOCK:
        import transformers

        return getattr(transformers, name)


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


def load_causal_lm(checkpoint: Path, dtype: Any = None, device: str = CPU, *,
                   offload: Offload | None = None) -> Any:
    """A causal LM from a local checkpoint (float32 unless ``dtype`` is given), moved to ``device``; with
    ``offload``, on the CPU within its memory budget, the rest of the weights on disk (accelerate)."""
    import torch

    auto_model = auto_class("AutoModelForCausalLM")
    placement: dict[str, Any] = offload.kwargs() if offload is not None else {}
    try:
        with _LOCK:
            model = auto_model.from_pretrained(
                str(checkpoint), dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True,
                local_files_only=True, **placement)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the model cannot be loaded here
        raise UnsupportedModel(f"transformers cannot load {checkpoint}: {e}") from e
    return model if offload is not None else model.to(device)


@dataclasses.dataclass(frozen=True)
class Offload:
    """Load a model that does not fit in memory: ``max_memory`` bytes of it on the CPU, the rest of its weights
    in ``folder`` on disk, read layer by layer during the forward pass (accelerate's ``device_map="auto"``)."""

    max_memory: int
    folder: Path

    def kwargs(self) -> dict[str, Any]:
        return {"device_map": "auto", "max_memory": {CPU: int(self.max_memory)}, "offload_folder": str(self.folder)}


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``; free pages where that is unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_bytes(parameters: int | None, dtype: Any) -> int | None:
    """Bytes the weights take in memory in ``dtype`` (None when the parameter count is unknown)."""
    import torch

    return None if parameters is None else parameters * torch.empty((), dtype=dtype).element_size()


def needs_offload(parameters: int | None, dtype: Any, budget: int) -> bool:
    """True when the weights (plus a quarter for activations and loading) do not fit in ``budget`` bytes."""
    need = model_bytes(parameters, dtype)
    return need is not None and need * 5 // 4 > budget


def load_tokenizer(checkpoint: Path, texts: Any = ()) -> Any:
    """The tokenizer of a local checkpoint, loaded in a limited, offline child (a
    :class:`converters.formats.hfchild.SourceTokenizer`); ``texts``: encoded in that child at once (see
    :func:`converters.formats.hfchild.tokenizer`)."""
    from converters.formats import hfchild

    return hfchild.tokenizer(checkpoint, texts)


def load_tokenizer_here(checkpoint: Path) -> Any:
    """The transformers tokenizer of a local checkpoint, loaded in this process (a child's work)."""
    try:
        with _LOCK:
            return auto_class("AutoTokenizer").from_pretrained(str(checkpoint), trust_remote_code=False,
                                                               local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a missing input
        raise InputError(f"cannot load the source tokenizer from {checkpoint}: {e}") from e


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (no-op for None)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
