"""Every file name of a work directory, built in one place (relative to the work dir; docs/ARCHITECTURE.md
"The work directory of one model" lists them). The stages write under these names, publishing and cleanup
find files by them (:mod:`converters.core.artifacts` says which names are which output kind), and a test that
needs a file's name asks here.
"""

from __future__ import annotations

# the typed records of the work dir (converters.core.workdir reads and writes them)
PLAN = "plan.json"
LADDER = "ladder.json"
REPORT = "report.json"
VARIANT = "variant.json"
KIND = "kind.json"  # a job that fell back from a metadata patch to the full run (bot.jobs.patch)
CHART = "size-vs-kld.png"

# folders
RECORDS_DIR = "records"  # one record per finished stage (converters.core.records owns their format)
VARIANTS_DIR = "variants"  # variants/<recipe>/: a variant's own work dir
SOURCE_DIR = "source"  # the fetched checkpoint
PUBLISHED_DIR = "published"  # a metadata patch's copy of the earlier publication
TUNE_DIR = "tune"  # per-tensor tuning: plans and measurements
SPEED = "speed.json"  # llama-bench tokens/s of the ladder's files (converters.ladder.speed)
PRUNED_DIR = "checkpoint-pruned"  # a variant's pruned checkpoint
HEALED_DIR = "checkpoint-healed"  # ... healed by distillation
TEACHER_DIR = "teacher"  # a variant's teacher reference when the teacher has no finished work dir
BASE_LOGITS = "base-logits.kld"  # the reference's log-probabilities on the evaluation text, until it finishes
TEACHER_LOGITS = "teacher-base-logits.kld"  # the teacher's base logits a variant is evaluated against

TUNED_SUFFIX = "-tuned"  # a size point's tuned file: ``<TYPE>-tuned``
MEASUREMENTS = f"{TUNE_DIR}/measurements.json"
VOCAB = "vocab-only.gguf"  # a metadata patch's vocab-only conversion


def reference(model_name: str, outtype: str) -> str:
    """The 16-bit (or F32) reference conversion: ``<Model>-BF16.gguf``."""
    return f"{model_name}-{outtype.upper()}.gguf"


def imatrix(model_name: str) -> tuple[str, str]:
    """The importance matrix: (GGUF form, legacy ``.dat`` form)."""
    return f"{model_name}-imatrix.gguf", f"{model_name}-imatrix.dat"


def quant(model_name: str, qtype: str) -> str:
    """One quant type's file: ``<Model>-<TYPE>.gguf`` (a tuned type too: ``<Model>-<TYPE>-tuned.gguf``)."""
    return f"{model_name}-{qtype}.gguf"


def split_parts(model_name: str, qtype: str, n: int) -> list[str]:
    """A split file's parts: a folder per type, as llama.cpp and the Hub's -hf loader expect."""
    stem = split_dir(model_name, qtype)
    return [f"{stem}/{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def split_dir(model_name: str, qtype: str) -> str:
    return f"{model_name}-{qtype}"


def tuned_type(qtype: str) -> str:
    """The ladder type of a size point's tuned file: ``Q4_K_M-tuned``."""
    return qtype + TUNED_SUFFIX


def tuned(model_name: str, qtype: str) -> str:
    return quant(model_name, tuned_type(qtype))


def layout(qtype: str) -> str:
    """A tuned file's plan: ``tune/<TYPE>-tuned.layout.json``."""
    return f"{TUNE_DIR}/{tuned_type(qtype)}.layout.json"


def tuned_layout(model_name: str, qtype: str) -> str:
    """A tuned file's plan as published beside it: ``<Model>-Q4_K_M-tuned.layout.json`` (a copy of
    :func:`layout`)."""
    return f"{model_name}-{tuned_type(qtype)}.layout.json"


def tensor_types(qtype: str) -> str:
    """The ``--tensor-type-file`` given to llama-quantize for a tuned file."""
    return f"{TUNE_DIR}/{tuned_type(qtype)}.tensor-types.txt"


def error_cache(digest: str) -> str:
    """The tuner's cache of measured errors for one key (the file name inside the cache folder, ``tune/`` by
    default): ``errors-<digest>.json``."""
    return f"errors-{digest}.json"


FIT_PREFIX = "fit-"  # a memory-budget file's ladder type: ``fit-16GB-32k`` (converters.ladder.budget)


def fit_type(label: str) -> str:
    """The ladder type of a memory-budget file: ``fit-16GB-32k``."""
    return FIT_PREFIX + label


def fit(model_name: str, label: str) -> str:
    """A memory-budget file: ``<Model>-fit-16GB-32k.gguf``."""
    return quant(model_name, fit_type(label))


def fit_layout(model_name: str, label: str) -> str:
    """Its plan, published beside it: ``<Model>-fit-16GB-32k.layout.json``."""
    return f"{model_name}-{fit_type(label)}.layout.json"


def fit_tensor_types(label: str) -> str:
    """The ``--tensor-type-file`` given to llama-quantize for a memory-budget file."""
    return f"{TUNE_DIR}/{fit_type(label)}.tensor-types.txt"


def projector(model_name: str, qtype: str) -> str:
    """A vision-language model's multimodal projector: ``mmproj-<Model>-F16.gguf``."""
    return f"mmproj-{model_name}-{qtype.upper()}.gguf"


def record(stage: str) -> str:
    """A stage's record: ``records/<stage>.json``."""
    return f"{RECORDS_DIR}/{stage}.json"
