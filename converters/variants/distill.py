"""Heal a pruned student by knowledge distillation from the original model (the teacher).

Loss: KL(teacher || student) on the next-token distributions, both softened by a temperature T and
scaled by T^2, averaged over tokens. AdamW with linear warm-up and cosine decay, gradient clipping,
bf16 on a GPU and fp32 on the CPU, gradient checkpointing optional. Every random choice is seeded, so a
run is reproducible on the same machine.

Two ways to spend less compute, both exact:

- **Train from the cut** (``trainable="from-cut"``, the default on the CPU). Depth pruning leaves the
  layers below the first removed one identical to the teacher's. Those are frozen, so the student's input
  to its first trainable layer *is* the teacher's hidden state there; the teacher's forward pass records
  it and the student runs only its upper layers (the same modules, the layer list sliced) from it. The
  shortcut is checked against the full student forward on the first batch and dropped if they differ.
- **Teacher outputs cached**: each calibration chunk's teacher logits (fp16) and hidden state are kept in
  memory when chunks are re-used (``samples`` < steps x batch) and they fit in MEMORY_CACHE_BYTES, and on
  disk when ``cache_dir`` is given (re-used by later runs with the same teacher, text and settings), so a
  chunk seen twice costs one teacher pass. Otherwise the teacher runs on the fly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.formats import hfmodel
from converters.variants import prune as prune_mod
from converters.core.errors import ConfigError, InputError
from converters.core.hooks import NULL_HOOKS, Hooks
from converters.core.records import atomic_output, fingerprint_file, write_json_atomic

log = logging.getLogger(__name__)

TRAINABLE = ("auto", "all", "from-cut")
CACHE_SCHEMA = 1
MEMORY_CACHE_BYTES = 2 << 30  # teacher outputs kept in RAM only when chunks are re-used and they fit in this


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 1
    seq_len: int = 256
    temperature: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int | None = None          # default: 10 % of the steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    samples: int | None = None               # distinct calibration chunks (default: steps x batch, no repeats)
    trainable: str = "auto"                  # "all" decoder layers, or "from-cut" (the layers from the first change)
    grad_checkpointing: bool = False
    cache_dir: Path | None = None            # teacher outputs on disk
    log_every: int = 10
    device: str | None = None                # default: cuda if visible, else cpu

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"distillation {name} must be a positive integer, not {v!r}", key=name)
        if self.seq_len < 2:
            raise ConfigError("distillation seq_len must be at least 2", key="seq_len")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, not {self.lr!r}", key="lr")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, not {self.temperature!r}", key="temperature")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, not {self.trainable!r}",
                              key="trainable")
        if self.samples is not None and self.samples < 1:
            raise ConfigError("samples must be positive", key="samples")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return d


@dataclasses.dataclass(frozen=True)
class DistillResult:
    steps: int
    losses: tuple[float, ...]
    seconds: float
    device: str
    dtype: str
    mode: str                     # "from-cut" (upper layers from the teacher's hidden state) or "full"
    first_trainable_layer: int
    trainable_parameters: int
    tokens: int
    teacher_passes: int
    config: dict[str, Any]

    @property
    def loss_first(self) -> float:
        k = max(1, min(10, len(self.losses) // 10 or 1))
        return sum(self.losses[:k]) / k

    @property
    def loss_last(self) -> float:
        k = max(1, min(10, len(self.losses) // 10 or 1))
        return sum(self.losses[-k:]) / k

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss_first"] = round(self.loss_first, 6)
        d["loss_last"] = round(self.loss_last, 6)
        d["losses"] = [round(x, 6) for x in self.losses]
        return d


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Learning rate for ``step`` (0-based): linear warm-up, then cosine decay to ``lr * min_ratio``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_schedule(n_chunks: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Which chunk indices each step uses: a seeded shuffle, walked in order, reshuffled each epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(n_chunks))
                rng.shuffle(order)
            batch.append(order.pop())
        out.append(batch)
    return out


def kl_loss(teacher_logits: Any, student_logits: Any, temperature: float = 1.0) -> Any:
    """T^2 * mean over tokens of KL(softmax(t/T) || softmax(s/T))."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature * temperature


def first_trainable(trainable: str, first_changed_layer: int | None, device: str) -> int:
    """Index of the first trainable student layer: 0 for "all"; one below the first change for "from-cut"."""
    mode = trainable
    if mode == "auto":
        mode = "all" if device.startswith("cuda") else "from-cut"
    if mode == "all" or not first_changed_layer:
        return 0
    return max(0, first_changed_layer - 1)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Teacher outputs
# --------------------------------------------------------------------------------------------------
class TeacherCache:
    """Teacher logits (fp16) and the hidden state entering layer ``layer`` for each chunk, in memory
    and optionally on disk."""

    def __init__(self, teacher: Any, chunks: Any, layer: int, *, directory: Path | None, key: dict[str, Any],
                 keep_in_memory: bool = True):
        self.teacher = teacher
        self.chunks = chunks
        self.layer = layer
        self.keep_in_memory = keep_in_memory
        self.memory: dict[int, tuple[Any, Any]] = {}
        self.passes = 0
        self.directory = None
        if directory is not None:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            self.directory = Path(directory) / f"teacher-{digest}"
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = self.directory / "meta.json"
            if not meta.exists():
                write_json_atomic(meta, {"schema": CACHE_SCHEMA, "key": key})

    def _file(self, i: int) -> Path | None:
        return None if self.directory is None else self.directory / f"chunk-{i:06d}.safetensors"

    def get(self, idx: Sequence[int]) -> tuple[Any, Any]:
        """(logits [b, s, V] float, hidden [b, s, H] float or None) for the chunks ``idx``."""
        import torch

        missing = [i for i in idx if i not in self.memory]
        on_disk = []
        for i in missing:
            f = self._file(i)
            if f is not None and f.exists():
                from safetensors.torch import load_file

                d = load_file(str(f))
                self.memory[i] = (d["logits"], d.get("hidden"))
                on_disk.append(i)
        todo = [i for i in missing if i not in on_disk]
        if todo:
            self._compute(todo)
        dev = self.chunks.device
        logits = torch.stack([self.memory[i][0] for i in idx]).to(dev).float()
        hid = [self.memory[i][1] for i in idx]
        hidden = None if any(h is None for h in hid) else torch.stack(hid).to(dev)
        if not self.keep_in_memory:
            self.memory.clear()
        return logits, hidden

    def _compute(self, idx: list[int]) -> None:
        import torch
        from safetensors.torch import save_file

        layers = prune_mod.decoder_layers(self.teacher)
        captured: dict[str, Any] = {}

        def hook(mod, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = layers[self.layer].register_forward_pre_hook(hook, with_kwargs=True) if self.layer > 0 else None
        try:
            with torch.no_grad():
                out = self.teacher(input_ids=self.chunks[idx], use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        self.passes += 1
        for j, i in enumerate(idx):
            logits = out.logits[j].to(torch.float16).cpu()
            hidden = captured["h"][j].cpu() if "h" in captured else None
            self.memory[i] = (logits, hidden)
            f = self._file(i)
            if f is not None:
                tensors = {"logits": logits} if hidden is None else {"logits": logits, "hidden": hidden.contiguous()}
                with atomic_output(f) as tmp:
                    save_file(tensors, str(tmp))


@contextlib.contextmanager
def upper_layers_only(model: Any, start: int):
    """Temporarily make ``model`` run only its decoder layers from ``start`` (fed with inputs_embeds)."""
    import torch

    decoder = model.get_decoder()
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        decoder.layers = full


def _student_logits(student: Any, input_ids: Any, hidden: Any, start: int) -> Any:
    if start > 0 and hidden is not None:
        with upper_layers_only(student, start):
            return student(inputs_embeds=hidden, use_cache=False).logits
    return student(input_ids=input_ids, use_cache=False).logits


def _lower_layers_identical(teacher: Any, student: Any, start: int) -> bool:
    """Are the student's embeddings and layers below ``start`` the teacher's, weight for weight?"""
    import torch

    tl, sl = prune_mod.decoder_layers(teacher), prune_mod.decoder_layers(student)
    pairs = [(teacher.get_input_embeddings(), student.get_input_embeddings())]
    pairs += [(tl[i], sl[i]) for i in range(start)]
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
STAGE = "distill"


@dataclasses.dataclass(frozen=True)
class _Setup:
    """Teacher, student and calibration chunks on one device, and which student parameters train."""

    teacher: Any
    student: Any
    chunks: Any
    device: str
    dtype: Any
    start: int  # first trainable decoder layer
    params: list[Any]
    source_dtype: str | None  # the student checkpoint's dtype, to save in


def _load(teacher_dir: Path, student_dir: Path, calibration: Path, config: DistillConfig, device: str,
          dtype: Any) -> tuple[Any, Any, Any]:
    """Teacher and student (same vocabulary required) and the calibration chunks."""
    tok = hfmodel.load_tokenizer(student_dir)
    if tok.get_vocab() != hfmodel.load_tokenizer(teacher_dir).get_vocab():
        raise InputError("teacher and student tokenizers differ; distillation needs the same vocabulary")
    text = prune_mod.read_text(calibration)
    wanted = config.samples or config.steps * config.batch_size
    chunks = prune_mod.token_chunks(tok, text, config.seq_len, wanted).to(device)
    teacher = hfmodel.load_causal_lm(teacher_dir, dtype=dtype, device=device).eval()
    student = hfmodel.load_causal_lm(student_dir, dtype=dtype, device=device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise InputError("teacher and student vocabularies differ in size")
    return teacher, student, chunks


def _trainable(teacher: Any, student: Any, config: DistillConfig, first_changed_layer: int | None,
               device: str) -> tuple[int, list[Any]]:
    """Freeze the student below the first trainable layer; (that layer, the trainable parameters)."""
    start = first_trainable(config.trainable, first_changed_layer, device)
    if start > 0 and not _lower_layers_identical(teacher, student, start):
        log.warning("distill: student layers below %d differ from the teacher's; training all layers", start)
        start = 0
    for p in student.parameters():
        p.requires_grad_(False)
    modules = list(prune_mod.decoder_layers(student))[start:]
    final_norm = getattr(student.get_decoder(), "norm", None)
    if final_norm is not None:
        modules.append(final_norm)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    if config.grad_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    return start, params


def _setup(teacher_dir: Path, student_dir: Path, calibration: Path, config: DistillConfig,
           first_changed_layer: int | None) -> _Setup:
    device = config.device or hfmodel.default_device()
    dtype = hfmodel.pick_dtype(device)
    teacher, student, chunks = _load(teacher_dir, student_dir, calibration, config, device, dtype)
    student_cfg = prune_mod.read_config(student_dir)  # the file's dtype: loading in fp32 changes the config's
    start, params = _trainable(teacher, student, config, first_changed_layer, device)
    return _Setup(teacher=teacher, student=student, chunks=chunks, device=device,
                  dtype=dtype, start=start, params=params,
                  source_dtype=student_cfg.get("dtype") or student_cfg.get("torch_dtype"))


def _teacher_cache(s: _Setup, teacher_dir: Path, calibration: Path, config: DistillConfig) -> TeacherCache:
    key = {"teacher": fingerprint_file(prune_mod.weight_files(teacher_dir)[0]), "text": fingerprint_file(Path(calibration)),
           "seq_len": config.seq_len, "chunks": int(s.chunks.shape[0]), "layer": s.start, "dtype": str(s.dtype)}
    n_chunks = int(s.chunks.shape[0])
    reused = n_chunks < config.steps * config.batch_size
    per_chunk = config.seq_len * (s.teacher.config.vocab_size * 2 + s.teacher.config.hidden_size * 4)
    keep = reused and n_chunks * per_chunk <= MEMORY_CACHE_BYTES
    if config.cache_dir is not None:
        log.info("distill: teacher outputs cached on disk (about %.2f GB)", n_chunks * per_chunk / 1e9)
    return TeacherCache(s.teacher, s.chunks, s.start, directory=config.cache_dir, key=key, keep_in_memory=keep)


def _mode(s: _Setup, cache: TeacherCache, first_batch: Sequence[int]) -> str:
    """``from-cut`` when the upper-layer shortcut reproduces the full forward on the first batch, else ``full``."""
    import torch

    if s.start <= 0:
        return "full"
    _, hidden = cache.get(first_batch)
    with torch.no_grad():
        full = s.student(input_ids=s.chunks[first_batch], use_cache=False).logits.float()
        part = _student_logits(s.student, s.chunks[first_batch], hidden, s.start).float()
    err = float((full - part).abs().max())
    if not err <= 1e-3 * max(1.0, float(full.abs().max())):
        log.warning("distill: upper-layer shortcut differs from the full forward (max %.3g); using full passes", err)
        return "full"
    return "from-cut"


def _train(s: _Setup, cache: TeacherCache, schedule: list[list[int]], mode: str, config: DistillConfig,
           hooks: Hooks) -> list[float]:
    """The optimisation loop; one ``hooks.step`` per step (which may stop it). The losses, step by step."""
    import torch

    warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 10
    opt = torch.optim.AdamW(s.params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    start = s.start if mode == "from-cut" else 0
    t0 = time.monotonic()
    losses: list[float] = []
    for step, idx in enumerate(schedule):
        lr = lr_at(step, config.steps, config.lr, warmup, config.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        t_logits, hidden = cache.get(idx)
        s_logits = _student_logits(s.student, s.chunks[idx], hidden if mode == "from-cut" else None, start)
        loss = kl_loss(t_logits, s_logits, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(s.params, config.max_grad_norm)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InputError(f"distillation diverged at step {step + 1} (loss {value}); lower the learning rate")
        losses.append(value)
        hooks.step(STAGE, step + 1, config.steps, f"loss {value:.4f}", loss=value, lr=lr)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.info("distill: step %d/%d loss %.4f lr %.3g (%.0fs)", step + 1, config.steps,
                     sum(losses[-config.log_every:]) / len(losses[-config.log_every:]), lr, time.monotonic() - t0)
    return losses


def distill(teacher_dir: Path, student_dir: Path, out_dir: Path, calibration: Path, config: DistillConfig, *,
            first_changed_layer: int | None = None, hooks: Hooks = NULL_HOOKS) -> DistillResult:
    """Train the student in ``student_dir`` toward the teacher on ``calibration`` text; write it to ``out_dir``.

    ``first_changed_layer``: index of the first student layer that differs from the teacher's (from
    :class:`converters.variants.prune.PruneResult`); enables training from the cut. After every step
    ``hooks.step("distill", step, steps, "loss 2.3100", loss=..., lr=...)``, which may stop the run.
    """
    t0 = time.monotonic()
    teacher_dir, student_dir, out_dir = Path(teacher_dir), Path(student_dir), Path(out_dir)
    if out_dir.resolve() in (teacher_dir.resolve(), student_dir.resolve()):
        raise ConfigError("the healed checkpoint must go to a new directory", key="out")
    seed_everything(config.seed)
    s = _setup(teacher_dir, student_dir, calibration, config, first_changed_layer)
    cache = _teacher_cache(s, teacher_dir, calibration, config)
    schedule = batch_schedule(int(s.chunks.shape[0]), config.steps, config.batch_size, config.seed)
    mode = _mode(s, cache, schedule[0])
    log.info("distill: %s <- %s: %d steps, batch %d x %d tokens, lr %g, T %g, %s %s, mode %s (layers %d.., "
             "%s trainable parameters)", student_dir.name, teacher_dir.name, config.steps, config.batch_size,
             config.seq_len, config.lr, config.temperature, s.device, hfmodel.dtype_name(s.dtype), mode, s.start,
             f"{sum(p.numel() for p in s.params):,}")
    losses = _train(s, cache, schedule, mode, config, hooks)
    s.student.eval()
    if config.grad_checkpointing:
        disable = (getattr(s.student, "activation_checkpointing_disable", None)
                   or s.student.gradient_checkpointing_disable)
        disable()
    save_checkpoint(s.student, student_dir, out_dir, s.source_dtype)
    result = DistillResult(
        steps=config.steps, losses=tuple(losses), seconds=round(time.monotonic() - t0, 3), device=s.device,
        dtype=hfmodel.dtype_name(s.dtype), mode=mode, first_trainable_layer=s.start,
        trainable_parameters=sum(p.numel() for p in s.params), tokens=config.steps * config.batch_size * config.seq_len,
        teacher_passes=cache.passes, config=config.to_json())
    log.info("distill: wrote %s; loss %.4f -> %.4f in %.0fs", out_dir, result.loss_first, result.loss_last,
             result.seconds)
    return result


def save_checkpoint(model: Any, source_dir: Path, out_dir: Path, dtype_name: str | None) -> None:
    """Save ``model`` as safetensors in the source checkpoint's dtype, with the source's side files."""
    import torch

    dtype = getattr(torch, str(dtype_name)) if dtype_name and hasattr(torch, str(dtype_name)) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for p in prune_mod.side_files(source_dir):
        if p.name != "generation_config.json":
            (out_dir / p.name).write_bytes(p.read_bytes())


# --------------------------------------------------------------------------------------------------
# Measuring (torch): how far a student is from the teacher on held-out text
# --------------------------------------------------------------------------------------------------
def teacher_logits(teacher_dir: Path, chunks: Any) -> Any:
    """Teacher logits (fp32, CPU) for ``chunks``, one chunk at a time."""
    import torch

    model = hfmodel.load_causal_lm(teacher_dir).eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=chunks[i: i + 1], use_cache=False).logits.float()
                          for i in range(chunks.shape[0])])


def compare(reference_logits: Any, model_dir: Path, chunks: Any, skip_first: int = 0) -> dict[str, float]:
    """Mean KLD(reference || model) per token and the share of tokens with the same top-1 token."""
    import torch
    import torch.nn.functional as F

    model = hfmodel.load_causal_lm(model_dir).eval()
    kl_sum = 0.0
    same = 0
    count = 0
    with torch.no_grad():
        for i in range(chunks.shape[0]):
            logits = model(input_ids=chunks[i: i + 1], use_cache=False).logits.float()[0, skip_first:]
            ref = reference_logits[i, skip_first:]
            t = F.log_softmax(ref, -1)
            s = F.log_softmax(logits, -1)
            kl_sum += float((t.exp() * (t - s)).sum())
            same += int((ref.argmax(-1) == logits.argmax(-1)).sum())
            count += ref.shape[0]
    return {"kld_mean": kl_sum / count, "same_top_p": same / count, "tokens": count}
