"""Expensive variant artefacts shared by test_prune.py and test_distill.py, built once per test session.

A plain module (not a conftest): both test modules call :func:`pruned_smollm2`, which builds the
``prune-4-layers`` variant of the SmolLM2 fixture once (prune on calibration text, then the ladder with
one quant type) once per test run (:func:`tests.shared.built_once`: once for all pytest-xdist workers too) and
memoizes it in the process.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from converters.ladder import pipeline
from tests.shared import built_once

_LOCK = threading.Lock()
_CACHE: dict[str, "PrunedVariant"] = {}

# lean settings: 4 calibration chunks of 128 tokens are enough to rank 30 layers
CALIB_SAMPLES = 4
CALIB_SEQ_LEN = 128


@dataclasses.dataclass(frozen=True)
class PrunedVariant:
    teacher: Path
    out: Path
    info: dict
    ladder: dict

    @property
    def checkpoint(self) -> Path:
        return Path(self.info["variant"]["path"])


def pruned_smollm2(tmp_path_factory: pytest.TempPathFactory, teacher: Path, calibration: Path, toolchain) -> PrunedVariant:
    from converters.llama import calibrate
    from converters.variants import recipes as variants

    with _LOCK:
        if "smollm2" not in _CACHE:
            base = variants.get("prune-4-layers")
            recipe = dataclasses.replace(base, prune=dataclasses.replace(
                base.prune, calib_samples=CALIB_SAMPLES, calib_seq_len=CALIB_SEQ_LEN))
            from bot.jobs.job import JobSpec, Source, run_job
            from converters.core.hooks import NULL_HOOKS

            def build(out: Path) -> None:
                v = variants.VariantOf(recipe, teacher, "SmolLM2-135M-Instruct", calibration)
                spec = JobSpec(source=Source(), model_name=variants.model_name("SmolLM2-135M-Instruct", recipe),
                               ladder=pipeline.LadderOptions(ladder="Q4_K_M", imatrix=False,
                                                             calibration=calibrate.TextFile.of(calibration)),
                               variant_of=v)
                run_job(spec, out, NULL_HOOKS, toolchain=toolchain)

            out = built_once(tmp_path_factory, "variant-prune4", build)
            _CACHE["smollm2"] = PrunedVariant(teacher, out, variants.load_info(out),
                                              json.loads((out / "ladder.json").read_text()))
        return _CACHE["smollm2"]
