"""Make deliberately broken copies of real GGUF files for tests (gguf-py's reader and writer).

- ``copy_with_metadata``: rewrite a GGUF with some keys changed or removed (any value type);
- ``set_number``: change a numeric key in place in a copy (same size: the file is edited through a memmap);
- ``damage_tensor``: a copy with one tensor's bytes zeroed (or its float data scaled).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def copy_with_metadata(src: Path, dst: Path, *, set_keys: Mapping[str, Any] | None = None,
                       remove: Iterable[str] = (), tensors: bool = True) -> Path:
    """``tensors=False`` writes the metadata only: enough for llama.cpp's vocab-only loading (llama-tokenize)."""
    import gguf

    set_keys = dict(set_keys or {})
    remove = set(remove)
    reader = gguf.GGUFReader(src, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in remove:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = set_keys.pop(field.name) if field.name in set_keys else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for key, value in set_keys.items():  # new keys: strings only in these tests
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    kept = reader.tensors if tensors else []
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


def set_number(src: Path, dst: Path, key: str, value: float) -> Path:
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    field = reader.get_field(key)
    if field is None:
        raise KeyError(key)
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return dst


def damage_tensor(src: Path, dst: Path, name: str, *, scale: float | None = None) -> Path:
    """Zero the bytes of tensor ``name`` (quantized: scales and values become 0), or scale a float tensor."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    for t in reader.tensors:
        if t.name == name:
            if scale is None:
                t.data[...] = 0
            else:
                if t.data.dtype not in (np.float32, np.float16):
                    raise ValueError(f"{name} is {t.tensor_type.name}: only float tensors can be scaled")
                t.data[...] = t.data * scale
            reader.data.flush()
            break
    else:
        raise KeyError(name)
    del reader
    return dst
