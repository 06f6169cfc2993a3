"""Prune a local HF checkpoint: remove whole decoder layers (depth) or MLP channels (width).

Depth pruning ranks the decoder layers by how little they change the hidden state on calibration text
and removes the least important ones:

- ``block_influence`` (ShortGPT, Men et al. 2024): BI_l = 1 - cos(h_l, h_{l+1}) averaged over tokens; the
  ``k`` layers with the lowest BI are removed (they need not be consecutive);
- ``angular`` (Gromov et al. 2024): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi; the block of ``n``
  consecutive layers starting where d is smallest is removed.

Width pruning keeps the ``intermediate_size`` MLP channels with the largest mean activation
``|act(gate(x)) * up(x)|`` (the input of ``down_proj``; Minitron's activation importance), the same
number in every layer so the config stays a single integer.

The result is a normal HF checkpoint (safetensors only): tensors renamed so the kept layers are numbered
``0..n-1``, ``num_hidden_layers`` and every per-layer config list (``layer_types``...) kept consistent, the
tokenizer, chat template and generation config copied. Remote code is never loaded or copied.

The pure parts (how many to remove, which ones, how to rename a tensor, how to edit the config) are
separate functions so they can be tested without a model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from converters.formats import hfmodel
from converters.core.errors import ConfigError, InputError, UnsupportedModel
from converters.core.hooks import LINE, NULL_HOOKS, Hooks
from converters.core.records import atomic_output, write_json_atomic

log = logging.getLogger(__name__)

DEPTH_METHODS = ("block_influence", "angular")
METHODS = ("depth", "width")

# Files never copied from the source checkpoint: weights (rewritten), remote code (never trusted),
# other weight formats (safetensors only).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".py", ".pyc")
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json"}

# Config keys that list layer *indices* (not one value per layer); remapped rather than sliced.
_INDEX_LIST_KEYS = ("mlp_only_layers", "full_attn_idxs", "global_attn_layers", "swa_layers", "rope_layers_idx")
# Config keys holding a layer count or a layer index threshold whose meaning pruning would change
# silently; we refuse rather than guess.
_THRESHOLD_KEYS = ("first_k_dense_replace", "max_window_layers", "num_kv_shared_layers", "moe_layer_start_index")

MAX_SHARD_BYTES = 4 << 30
BF16_ABOVE_PARAMS = 2_000_000_000


# --------------------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """What to prune. Depth: ``layers`` (a count) or ``fraction`` of the decoder layers. Width: ``fraction``
    of the MLP intermediate channels (or ``layers`` is not used)."""

    method: str = "depth"
    importance: str = "block_influence"
    layers: int | None = None
    fraction: float | None = None
    calib_samples: int = 16
    calib_seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"prune method must be one of {', '.join(METHODS)}, not {self.method!r}", key="method")
        if self.method == "depth" and self.importance not in DEPTH_METHODS:
            raise ConfigError(f"depth importance must be one of {', '.join(DEPTH_METHODS)}, not {self.importance!r}",
                              key="importance")
        if (self.layers is None) == (self.fraction is None):
            raise ConfigError("give exactly one of a layer count or a fraction to prune", key="layers")
        if self.method == "width" and self.layers is not None:
            raise ConfigError("width pruning takes a fraction of the MLP channels, not a layer count", key="layers")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise ConfigError(f"layers to remove must be a positive integer, not {self.layers!r}", key="layers")
        if self.fraction is not None and not (0.0 < self.fraction < 1.0):
            raise ConfigError(f"fraction to prune must be in (0, 1), not {self.fraction!r}", key="fraction")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise ConfigError("calibration needs at least one sample of at least two tokens", key="calib_samples")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    method: str
    importance: str
    layers_before: int
    layers_after: int
    removed_layers: tuple[int, ...]          # original indices (depth); empty for width
    kept_layers: tuple[int, ...]             # original index of each new layer
    scores: tuple[float, ...]                # per layer (BI) or per block start (angular) or per layer mean (width)
    intermediate_before: int | None
    intermediate_after: int | None
    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    calibration: dict[str, Any]

    @property
    def first_changed_layer(self) -> int:
        """Index (in the pruned model) of the first layer whose input can differ from the teacher's."""
        if self.removed_layers:
            return min(self.removed_layers)
        return 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["first_changed_layer"] = self.first_changed_layer
        return d


# --------------------------------------------------------------------------------------------------
# Pure planning
# --------------------------------------------------------------------------------------------------
def count_to_remove(total: int, layers: int | None = None, fraction: float | None = None, what: str = "layers") -> int:
    """How many of ``total`` units to remove; at least one must remain and at least one must go."""
    if total < 2:
        raise InputError(f"cannot prune a model with {total} {what}")
    if layers is not None:
        k = layers
    elif fraction is not None:
        k = int(round(total * fraction))
    else:
        raise ConfigError("give a layer count or a fraction to prune", key="layers")
    if k >= total:
        raise ConfigError(f"cannot remove {k} {what}: the model has only {total} (at least one must remain)",
                          key="layers")
    if k < 1:
        raise ConfigError(f"pruning {fraction!r} of {total} {what} removes nothing", key="fraction")
    return k


def select_lowest(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (ties broken by the deeper layer: later layers go first)."""
    if k > len(scores):
        raise ConfigError(f"cannot remove {k} layers: the model has only {len(scores)}", key="layers")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:k])


def select_block(distances: Sequence[float], n: int) -> list[int]:
    """The block of ``n`` consecutive layers starting at the smallest angular distance (ties: deeper)."""
    if not distances:
        raise ConfigError(f"cannot remove a block of {n} layers", key="layers")
    start = min(range(len(distances)), key=lambda i: (distances[i], -i))
    return list(range(start, start + n))


def layer_map(total: int, removed: Iterable[int]) -> dict[int, int]:
    """Old layer index -> new index for every kept layer."""
    gone = set(removed)
    bad = [i for i in gone if not 0 <= i < total]
    if bad:
        raise ConfigError(f"layer indices {sorted(bad)} out of range 0..{total - 1}", key="layers")
    kept = [i for i in range(total) if i not in gone]
    return {old: new for new, old in enumerate(kept)}


def find_layer_prefix(keys: Iterable[str], num_layers: int) -> str:
    """The tensor-name prefix of the decoder layers (``model.layers``), found as the ``X.layers.N.`` family
    with exactly ``num_layers`` distinct indices ``0..num_layers-1``."""
    found: dict[str, set[int]] = {}
    for k in keys:
        for m in re.finditer(r"(?:^|\.)layers\.(\d+)\.", k):
            prefix = k[: m.start() + (1 if m.start() else 0)] + "layers"
            prefix = prefix.lstrip(".")
            found.setdefault(prefix, set()).add(int(m.group(1)))
    fits = [p for p, idx in found.items() if idx == set(range(num_layers))]
    if len(fits) != 1:
        raise UnsupportedModel(
            f"cannot tell the decoder layers apart in the checkpoint (candidates {sorted(found)} for "
            f"{num_layers} layers)")
    return fits[0]


def rename_tensor(name: str, prefix: str, mapping: dict[int, int]) -> str | None:
    """New name of a tensor after depth pruning, or None when it belongs to a removed layer."""
    head = prefix + "."
    if not name.startswith(head):
        return name
    idx, dot, rest = name[len(head):].partition(".")
    if not dot or not idx.isdigit():
        return name
    new = mapping.get(int(idx))
    return None if new is None else f"{head}{new}.{rest}"


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The dict that holds ``num_hidden_layers`` (top level, or ``text_config`` for multimodal configs)."""
    if "num_hidden_layers" in config:
        return config
    tc = config.get("text_config")
    if isinstance(tc, dict) and "num_hidden_layers" in tc:
        return tc
    raise UnsupportedModel("config.json has no num_hidden_layers")


def num_layers_of(config: dict[str, Any]) -> int:
    return int(_text_config(config)["num_hidden_layers"])


def prune_config(config: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """A new config for a model keeping the original layers ``kept`` (sorted original indices).

    ``num_hidden_layers`` becomes ``len(kept)``; every list with one entry per layer is sliced; lists of
    layer indices (``mlp_only_layers``...) are renumbered; thresholds whose meaning would silently change
    (``first_k_dense_replace``...) are refused unless the pruning leaves them valid.
    """
    new = json.loads(json.dumps(config))
    tc = _text_config(new)
    n = int(tc["num_hidden_layers"])
    mapping = {old: i for i, old in enumerate(kept)}
    for key, value in list(tc.items()):
        if key in _INDEX_LIST_KEYS and isinstance(value, list):
            tc[key] = [mapping[v] for v in value if isinstance(v, int) and v in mapping]
        elif isinstance(value, list) and len(value) == n and key not in ("architectures",):
            tc[key] = [value[i] for i in kept]
        elif key in _THRESHOLD_KEYS and isinstance(value, int) and 0 < value < n:
            # unchanged meaning only if no layer below the threshold was removed
            if any(i not in mapping for i in range(value)):
                raise UnsupportedModel(f"config field {key}={value} would change meaning when layers below it "
                                       f"are removed")
    tc["num_hidden_layers"] = len(kept)
    return new


def width_config(config: dict[str, Any], intermediate: int) -> dict[str, Any]:
    new = json.loads(json.dumps(config))
    tc = _text_config(new)
    if not isinstance(tc.get("intermediate_size"), int):
        raise UnsupportedModel("width pruning needs a single integer intermediate_size in the config")
    tc["intermediate_size"] = intermediate
    return new


# --------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------
def read_config(checkpoint: Path) -> dict[str, Any]:
    p = Path(checkpoint) / "config.json"
    if not p.is_file():
        raise InputError(f"{checkpoint} is not a HF checkpoint: config.json is missing")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise InputError(f"{p}: not valid JSON ({e})") from e


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files of a checkpoint (single file or the shards named in the index)."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [checkpoint / n for n in names]
    else:
        files = sorted(checkpoint.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"{checkpoint} has no safetensors weights (other formats are not loaded)")
    return files


def tensor_names(checkpoint: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for f in weight_files(checkpoint):
        with safe_open(str(f), framework="pt") as st:
            names.extend(st.keys())
    return names


def count_parameters(checkpoint: Path) -> int:
    """Parameters stored in the checkpoint's safetensors (tied weights counted once, as stored)."""
    from safetensors import safe_open

    total = 0
    for f in weight_files(checkpoint):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def weights_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(checkpoint))


def side_files(src: Path) -> list[Path]:
    """Tokenizer, chat template, generation config and other small files of a checkpoint (no weights, no code,
    no config.json), sorted by name."""
    return [p for p in sorted(Path(src).iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES
            and p.suffix not in _SKIP_SUFFIXES]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy :func:`side_files` of ``src`` into ``dst``."""
    copied = []
    for p in side_files(src):
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


TensorTransform = Callable[[str, Any], "list[tuple[str, Any]]"]


def rewrite_checkpoint(src: Path, dst: Path, config: dict[str, Any], transform: TensorTransform) -> None:
    """Write ``dst`` from ``src``: every tensor passed through ``transform(name, tensor) -> [(name, tensor)]``
    (empty list drops it), the given config, the side files copied. Shards above MAX_SHARD_BYTES."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for old in list(dst.glob("*.safetensors")) + [dst / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    metadata = {"format": "pt"}
    for f in weight_files(src):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                for new_name, t in transform(name, st.get_tensor(name)):
                    nbytes = t.numel() * t.element_size()
                    if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
                        shards.append({})
                        size = 0
                    shards[-1][new_name] = t.contiguous()
                    size += nbytes
    if len(shards) == 1:
        with atomic_output(dst / "model.safetensors") as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with atomic_output(dst / name) as tmp:
                save_file(shard, str(tmp), metadata=metadata)
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        write_json_atomic(dst / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    copy_side_files(src, dst)
    write_json_atomic(dst / "config.json", config)


# --------------------------------------------------------------------------------------------------
# Calibration and importance (torch)
# --------------------------------------------------------------------------------------------------
def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers of a transformers causal LM."""
    import torch

    n = num_layers_of(model.config.to_dict())
    try:
        layers = model.get_decoder().layers
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
            return layers
    except AttributeError:
        pass
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise UnsupportedModel("cannot find the decoder layers of the model")


def token_chunks(tokenizer: Any, text: str, seq_len: int, count: int | None = None, offset: int = 0) -> Any:
    """Non-overlapping chunks of ``seq_len`` tokens (a LongTensor [n, seq_len]) from ``text``."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    usable = (len(ids) - offset) // seq_len
    if usable < 1:
        raise InputError(f"calibration text too short: {len(ids)} tokens for chunks of {seq_len}")
    n = usable if count is None else min(count, usable)
    t = torch.tensor(ids[offset: offset + n * seq_len], dtype=torch.long)
    return t.view(n, seq_len)


def read_text(path: Path, max_chars: int | None = None) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration text {p} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise InputError(f"calibration text {p} is empty")
    return text


@dataclasses.dataclass
class LayerStats:
    """Hidden-state similarities measured over calibration tokens."""

    num_layers: int
    cos_sum: list[list[float]]      # cos_sum[l][n-1]: summed cos(h_l, h_{l+n}) for every n (l + n <= L)
    tokens: int
    channel_act: list[Any] | None   # per layer: summed |input of down_proj| per intermediate channel

    def block_influence(self) -> list[float]:
        return [1.0 - self.cos_sum[l][0] / self.tokens for l in range(self.num_layers)]

    def angular(self, n: int) -> list[float]:
        """Mean angular distance arccos(cos(h_l, h_{l+n}))/pi for every block start l (of L - n + 1)."""
        out = []
        for l in range(self.num_layers - n + 1):
            c = max(-1.0, min(1.0, self.cos_sum[l][n - 1] / self.tokens))
            out.append(math.acos(c) / math.pi)
        return out


def measure(model: Any, batches: Any, *, width: bool = False, hooks: Hooks = NULL_HOOKS) -> LayerStats:
    """Run the calibration chunks through the model, recording the input of every decoder layer and the
    output of the last one (before the final norm), and optionally the MLP channel activations."""
    import torch

    layers = decoder_layers(model)
    L = len(layers)
    hidden: list[Any] = [None] * (L + 1)
    handles = []

    def pre(i: int):
        def hook(mod, args, kwargs):
            hidden[i] = (args[0] if args else kwargs["hidden_states"]).detach().float()
        return hook

    def post(mod, args, kwargs, output):
        hidden[L] = (output[0] if isinstance(output, tuple) else output).detach().float()

    channel: list[Any] | None = None
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
    handles.append(layers[L - 1].register_forward_hook(post, with_kwargs=True))
    if width:
        channel = [None] * L
        for i, layer in enumerate(layers):
            mlp = getattr(layer, "mlp", None)
            down = getattr(mlp, "down_proj", None)
            if down is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj")):
                raise UnsupportedModel("width pruning needs llama-style MLPs (mlp.gate_proj/up_proj/down_proj)")

            def dhook(mod, args, i=i):
                a = args[0].detach().float().abs().sum(dim=tuple(range(args[0].dim() - 1)))
                channel[i] = a if channel[i] is None else channel[i] + a
            handles.append(down.register_forward_pre_hook(dhook))
    cos_sum = [[0.0] * (L - l) for l in range(L)]
    tokens = 0
    try:
        with torch.no_grad():
            for b in range(batches.shape[0]):
                model(input_ids=batches[b: b + 1].to(model.device), use_cache=False)
                hs = [torch.nn.functional.normalize(h[0], dim=-1) for h in hidden]
                for l in range(L):
                    for n in range(1, L - l + 1):
                        cos_sum[l][n - 1] += float((hs[l] * hs[l + n]).sum())
                tokens += hs[0].shape[0]
                done, total = b + 1, batches.shape[0]
                if done == total or done % 4 == 0:
                    _say(hooks, f"calibration chunk {done}/{total}")
                hooks.check_cancel()
    finally:
        for h in handles:
            h.remove()
    return LayerStats(num_layers=L, cos_sum=cos_sum, tokens=tokens, channel_act=channel)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
STAGE = "prune"


def _say(hooks: Hooks, msg: str) -> None:
    log.info("prune: %s", msg)
    hooks.emit(STAGE, LINE, text=msg)


@dataclasses.dataclass(frozen=True)
class _Cut:
    """What a pruning removes: the kept layers, the per-unit scores, the new config and the tensor rewrite."""

    removed: tuple[int, ...]
    kept: tuple[int, ...]
    scores: tuple[float, ...]
    config: dict[str, Any]
    transform: TensorTransform
    intermediate_after: int | None


def _amount(config: dict[str, Any], spec: PruneSpec) -> int:
    """How many layers (depth) or MLP channels (width) go; checked before any expensive work."""
    if spec.method == "depth":
        return count_to_remove(num_layers_of(config), spec.layers, spec.fraction)
    inter = _text_config(config).get("intermediate_size")
    if not isinstance(inter, int):
        raise UnsupportedModel("width pruning needs a single integer intermediate_size in the config")
    return count_to_remove(inter, None, spec.fraction, what="MLP channels")


def _importance(source: Path, layers: int, spec: PruneSpec, calibration: Path,
                hooks: Hooks) -> tuple[LayerStats, Any]:
    """Hidden-state statistics of ``source`` on the calibration chunks (and the chunks)."""
    import torch

    torch.manual_seed(spec.seed)
    text = read_text(calibration)
    tok = hfmodel.load_tokenizer(source)
    chunks = token_chunks(tok, text, spec.calib_seq_len, spec.calib_samples)
    _say(hooks, f"measuring layer importance of {source.name} ({layers} layers) on {chunks.shape[0]} x "
                f"{chunks.shape[1]} tokens")
    # fp32 for small models (exact statistics); bf16 above BF16_ABOVE_PARAMS so a large model fits in memory
    device = hfmodel.default_device()
    dtype = hfmodel.pick_dtype(device, parameters=count_parameters(source), f32_max_params=BF16_ABOVE_PARAMS)
    model = hfmodel.load_causal_lm(source, dtype=dtype, device=device)
    model.eval()
    stats = measure(model, chunks, width=spec.method == "width", hooks=hooks)
    del model
    return stats, chunks


def _depth_cut(stats: LayerStats, spec: PruneSpec, k: int, config: dict[str, Any], prefix: str,
               hooks: Hooks) -> _Cut:
    if spec.importance == "block_influence":
        scores = stats.block_influence()
        removed = select_lowest(scores, k)
    else:
        scores = stats.angular(k)
        removed = select_block(scores, k)
    mapping = layer_map(stats.num_layers, removed)
    kept = sorted(mapping)

    def transform(name: str, t: Any) -> list[tuple[str, Any]]:
        new = rename_tensor(name, prefix, mapping)
        return [] if new is None else [(new, t)]
    shown = [round(scores[i], 4) for i in removed] if spec.importance == "block_influence" else round(min(scores), 4)
    _say(hooks, f"removing layers {removed} (scores {shown})")
    return _Cut(tuple(removed), tuple(kept), tuple(scores), prune_config(config, kept), transform,
                _intermediate(config))


def _width_cut(stats: LayerStats, k: int, config: dict[str, Any], prefix: str, hooks: Hooks) -> _Cut:
    import torch

    inter_before = _intermediate(config)
    assert stats.channel_act is not None and inter_before is not None
    keep_n = inter_before - k
    keep_idx = [torch.sort(torch.topk(a.cpu(), keep_n).indices).values for a in stats.channel_act]
    scores = [float(a.mean() / stats.tokens) for a in stats.channel_act]
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")

    def transform(name: str, t: Any) -> list[tuple[str, Any]]:
        m = pat.match(name)
        if not m:
            return [(name, t)]
        idx = keep_idx[int(m.group(1))]
        if m.group(2) == "down_proj":
            return [(name, t if m.group(3) == "bias" else t[:, idx])]
        return [(name, t[idx])]
    _say(hooks, f"keeping {keep_n} of {inter_before} MLP channels per layer")
    return _Cut((), tuple(range(stats.num_layers)), tuple(scores), width_config(config, keep_n), transform, keep_n)


def _intermediate(config: dict[str, Any]) -> int | None:
    inter = _text_config(config).get("intermediate_size")
    return inter if isinstance(inter, int) else None


def prune(source: Path, dest: Path, spec: PruneSpec, calibration: Path, *, hooks: Hooks = NULL_HOOKS) -> PruneResult:
    """Prune ``source`` into ``dest`` following ``spec``, measuring importance on ``calibration`` text.

    Each step is a ``line`` event of stage ``prune`` on ``hooks``; ``hooks.check_cancel()`` may stop the
    calibration between chunks.
    """
    t0 = time.monotonic()
    source, dest = Path(source), Path(dest)
    if source.resolve() == dest.resolve():
        raise ConfigError("the pruned checkpoint must go to a new directory", key="out")
    config = read_config(source)
    k = _amount(config, spec)
    prefix = find_layer_prefix(tensor_names(source), num_layers_of(config))
    stats, chunks = _importance(source, num_layers_of(config), spec, calibration, hooks)
    cut = (_depth_cut(stats, spec, k, config, prefix, hooks) if spec.method == "depth"
           else _width_cut(stats, k, config, prefix, hooks))
    rewrite_checkpoint(source, dest, cut.config, cut.transform)
    result = PruneResult(
        method=spec.method, importance=spec.importance if spec.method == "depth" else "activation",
        layers_before=stats.num_layers, layers_after=len(cut.kept), removed_layers=cut.removed, kept_layers=cut.kept,
        scores=tuple(round(s, 6) for s in cut.scores), intermediate_before=_intermediate(config),
        intermediate_after=cut.intermediate_after, parameters_before=count_parameters(source),
        parameters_after=count_parameters(dest), bytes_before=weights_bytes(source), bytes_after=weights_bytes(dest),
        seconds=round(time.monotonic() - t0, 3),
        calibration={"name": Path(calibration).name, "samples": int(chunks.shape[0]),
                     "seq_len": int(chunks.shape[1])})
    _say(hooks, f"wrote {dest} ({result.layers_after} layers, {result.parameters_after:,} parameters) "
                f"in {result.seconds:.1f}s")
    return result
