"""One short real llama-bench run (pp 64 / tg 8, one repetition) on the smallest file of the SmolLM2 ladder."""

from __future__ import annotations

from converters.core.workdir import WorkDir
from converters.llama import bench


def test_llama_bench_measures_a_ladder_file(smol_workdir, toolchain):
    f = min(WorkDir(smol_workdir).ladder().files, key=lambda f: f.size)
    run = bench.run(toolchain, smol_workdir / f.path, prompt=64, generate=8, repetitions=1, n_threads=2)
    assert (run.prompt, run.generate, run.threads) == (64, 8, 2)
    assert len(run.pp.samples) == len(run.tg.samples) == 1 and run.pp.mean > 0 and run.tg.mean > 0
    assert run.backend and run.device.endswith(f"({run.backend})") and run.seconds > 0
