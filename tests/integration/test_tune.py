"""Stage tune on a real (tiny) model with the real llama.cpp tools: a tuned file per size point whose tensor types
are exactly the plan's, within the stock file's bytes, that llama.cpp loads with a finite perplexity."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from converters.ladder import layout
from converters.core import proc
from converters.ladder import tune
from tests.models import tiny_random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.llama]


@pytest.fixture(scope="module")
def tuned_workdir(tmp_path_factory, calibration_text, toolchain) -> Path:
    from bot.jobs.job import JobSpec, Source, run_job
    from converters.llama.calibrate import TextFile
    from converters.core.hooks import NULL_HOOKS
    from converters.ladder.pipeline import LadderOptions

    root = tmp_path_factory.mktemp("tune")
    src = root / "tiny-llama"
    shutil.copytree(tiny_random_checkpoint("llama"), src)
    spec = JobSpec(source=Source(path=src), model_name="tiny-llama",
                   ladder=LadderOptions(ladder="Q4_K_M,Q2_K", calibration=TextFile.of(calibration_text),
                                        calibration_chunks=2, ctx=128, tune=("Q4_K_M", "Q2_K"), tune_seconds=600,
                                        tune_candidates=("Q2_K", "Q4_K", "Q8_0"),  # + the stock files' types
                                        tune_confirm=False),  # a random model's plan need not beat stock
                   evaluation=None)  # evaluate and the gate of tuned files: tests/unit/test_tuned_gate.py, benchmarks/layout.py
    out = root / "work"
    run_job(spec, out, NULL_HOOKS, toolchain=toolchain)
    return out


def test_tuned_files_match_their_layout_and_budget(tuned_workdir):
    ladder = json.loads((tuned_workdir / "ladder.json").read_text())
    files = {f["type"]: f for f in ladder["files"]}
    assert set(files) == {"Q4_K_M", "Q2_K", "Q4_K_M-tuned", "Q2_K-tuned"}
    for point in ("Q4_K_M", "Q2_K"):
        f, stock = files[f"{point}-tuned"], files[point]
        path = tuned_workdir / f["path"]
        assert path.name == f"tiny-llama-{point}-tuned.gguf"
        lay = json.loads((tuned_workdir / f["tuned"]["layout"]).read_text())
        assert lay["size_point"] == point and lay["budget"] <= stock["size"]
        written = tune.read_types(path)
        assert {t["name"]: t["type"] for t in lay["tensors"]} == {n: written[n] for n in
                                                                 (t["name"] for t in lay["tensors"])}
        assert path.stat().st_size == f["size"] <= stock["size"]
        # every choice is a measured candidate valid for the tensor's rows, and the plan predicts no loss
        for t in lay["tensors"]:
            assert t["type"] in t["candidates"] and layout.valid(t["type"], t["shape"][0])
        assert lay["predicted_kld"] <= lay["stock_predicted_kld"] + 1e-12
        # built by ggufbot-assemble (a compiler is here): no --tensor-type-file for llama-quantize was written
        assert not (tuned_workdir / "tune" / f"{point}-tuned.tensor-types.txt").exists()
    from converters.core import records

    rec = records.load(tuned_workdir, "tune")
    assert rec is not None and rec.extra["points"]["Q4_K_M"]["status"] == "built"
    meas = json.loads((tuned_workdir / "tune" / "measurements.json").read_text())
    assert meas["fit"]["scales"] and all(s == 1.0 for s in meas["fit"]["scales"].values())
    # confirm off: no calibration run at all (one scale for every group; the evaluation's gate is the check)
    assert meas["observations"] == [] and rec.extra["calibration_runs"] == 0
    assert set(rec.extra["seconds"]) >= {"errors", "solve", "builds"} and "calibration" not in rec.extra["seconds"]
    assert rec.extra["points"]["Q4_K_M"]["confirmed"] is False
    assert not list((tuned_workdir / "tune").glob("calibration-*"))


def test_tuned_file_loads_with_finite_perplexity(tuned_workdir, eval_text, toolchain, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(eval_text.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    res = proc.run([toolchain.program("llama-perplexity"), "-m", tuned_workdir / "tiny-llama-Q2_K-tuned.gguf",
                      "-f", short, "-c", "128", "--chunks", "2", "-t", "2"], timeout=600)
    m = re.search(r"Final estimate: PPL = ([0-9.]+|nan|inf)", res.stdout + res.stderr)
    assert m and math.isfinite(float(m.group(1)))

