"""Issue 19.1: each program's time limit is derived from its work (tokens to generate, chunks x ctx to evaluate,
bytes to convert or quantize) with a floor of seconds, not one 30-minute minimum for every program; the settings'
``[limits]`` keys size it; a program over its limit is killed (a real child process, no llama.cpp needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import gguf
import pytest

from bot.model import settings as S
from converters.formats import checkpoint as ck
from converters.ladder import job
from converters.ladder import pipeline
from converters.core import records
from converters.llama import verify
from converters.llama.calibrate import TextFile
from converters.core.errors import ConfigError, ToolError
from converters.core.hooks import NULL_HOOKS
from converters.llama.toolchain import Toolchain
from tests.bot_fixtures import SMALL_LAYER, safetensors_bytes

MB = 1_000_000
SMOL_BF16 = 270 * MB  # SmolLM2-135M's BF16 reference
OLD_FLOOR = 1800.0  # today's limits.tool_min_seconds: every program, whatever it does


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_64_token_generation_on_a_135m_model_gets_minutes_not_half_an_hour(tmp_path: Path) -> None:
    model = sparse(tmp_path / "SmolLM2-BF16.gguf", SMOL_BF16)
    with verify.limited(job.ToolLimits().generation()):
        seconds = verify.generation_timeout(model, "x" * 200, 64)
    # measured there: 0.92 s a token on a 2-core box loaded 3 times over, so about a minute; allowed minutes, not 30
    assert 64 * 0.92 * 3 <= seconds <= 480, seconds
    assert seconds < OLD_FLOOR / 3


def test_a_generation_limit_grows_with_tokens_and_model_size(tmp_path: Path) -> None:
    small, big = sparse(tmp_path / "s.gguf", 100 * MB), sparse(tmp_path / "b.gguf", 16_000 * MB)
    with verify.limited(job.ToolLimits().generation()):
        assert verify.generation_timeout(small, "hi", 64) < verify.generation_timeout(small, "hi", 512)
        assert verify.generation_timeout(small, "hi", 64) < verify.generation_timeout(big, "hi", 64)
        # an 8B model's 64 tokens on a slow CPU (a few seconds a token) still fit, with room
        assert verify.generation_timeout(big, "hi", 64) > 64 * 5


def test_a_split_model_counts_every_part(tmp_path: Path) -> None:
    parts = [sparse(tmp_path / f"M-Q8_0-0000{i}-of-00003.gguf", 10 * MB) for i in (1, 2, 3)]
    assert verify.model_bytes(parts[0]) == 30 * MB


# ------------------------------------------------------------------------------------------ per stage
CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8,
       "intermediate_size": [16, 16], "vocab_size": 16}


def job_context(tmp: Path, *, calibration_chunks: int | None = 8, weights: int = SMOL_BF16, jobs: int = 1,
                limits: job.ToolLimits = job.ToolLimits()) -> job.JobContext:
    root = tmp / "ck"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CFG))
    (root / "model.safetensors").write_bytes(safetensors_bytes(SMALL_LAYER))
    (root / "tokenizer.json").write_text("{}")
    text = tmp / "cal.txt"
    text.write_text("word " * 20_000)
    checkpoint = ck.inspect(root)
    checkpoint = dataclasses.replace(checkpoint, weight_bytes=weights)
    ctx = job.JobContext(tmp / "work", None, NULL_HOOKS, "M", checkpoint_dir=root, limits=limits)
    ctx.checkpoint = checkpoint
    cal = TextFile.of(text)
    ctx.plan = pipeline.plan(checkpoint, ctx.workdir, model_name="M", options=pipeline.LadderOptions(
        ladder="Q8_0", calibration=cal, calibration_chunks=calibration_chunks, ctx=256, jobs=jobs))
    ctx.reference = records.StageRecord("convert", {}, (records.Output("M-BF16.gguf", weights, "0" * 64),), 1.0,
                                        None, "now")
    return ctx


def evaluation(chunks: int | None) -> job.EvaluateStage:
    return job.EvaluateStage(job.EvalSettings(TextFile(Path("e.txt"), "e", "t", "0" * 64, 0),
                                              chunks=chunks))


def test_each_stage_sizes_its_programs_from_its_work(tmp_path: Path) -> None:
    ctx = job_context(tmp_path)
    floor = ctx.limits.min_seconds
    convert = job.stage_timeout(job.ConvertStage(), ctx)
    calibrate = job.stage_timeout(job.CalibrateStage(), ctx)
    quantize = job.stage_timeout(job.QuantizeStage(), ctx)
    evaluate_few, evaluate_many = (job.stage_timeout(evaluation(n), ctx) for n in (4, 64))
    for seconds in (convert, calibrate, quantize, evaluate_few):
        assert seconds is not None and floor <= seconds < OLD_FLOOR, (convert, calibrate, quantize, evaluate_few)
    # chunks x ctx: 64 chunks of 256 tokens take about 750 s on that busy box: more than the old one-size limit gave
    assert evaluate_few < 64 * 256 * 0.046 * 3 < evaluate_many
    # a stage that does not size its programs (tune, a variant's teacher logits: llama-perplexity over the default
    # evaluation) gets at least the evaluation's limit

    class Unsized:
        name, quiet = "teacher-logits", False

    assert job.stage_timeout(Unsized(), ctx) >= evaluate_many
    # 8 chunks x 256 tokens on a 270 MB model (measured: 0.046 s a token on a busy 2-core box, 95 s): minutes
    assert 2048 * 0.046 * 3 < calibrate < 900


def test_stage_limits_grow_with_the_work(tmp_path: Path) -> None:
    small = job_context(tmp_path / "a", calibration_chunks=8)
    big = job_context(tmp_path / "b", calibration_chunks=200, weights=16_000 * MB, jobs=2)
    for stage in (job.ConvertStage(), job.CalibrateStage(), job.QuantizeStage(), evaluation(None)):
        a, b = job.stage_timeout(stage, small), job.stage_timeout(stage, big)
        assert a is not None and b is not None and a < b, (stage.name, a, b)
    # all of a calibration text (no chunk count): sized from its length
    whole = job_context(tmp_path / "c", calibration_chunks=None)
    assert job.stage_timeout(job.CalibrateStage(), whole) > job.stage_timeout(job.CalibrateStage(), small)


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()


def test_tool_timeout_is_the_running_stages_limit(tmp_path: Path) -> None:
    ctx = job_context(tmp_path)
    seen: list[float | None] = []

    class Probe:
        name, quiet = "probe", True

        def program_seconds(self, ctx: job.JobContext) -> float:
            return 123.0

        def run(self, ctx: job.JobContext) -> None:
            seen.append(ctx.tool_timeout())

    job.run_stages([Probe()], ctx)
    assert seen == [123.0]


# ------------------------------------------------------------------------------------------ enforced
def tiny_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_token_list(["<s>", "</s>"])
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_generation_over_its_derived_limit_is_killed(tmp_path: Path) -> None:
    """A llama-completion that hangs (a script that never answers) is killed at the generation's own limit, set from
    the job's settings by run_stages, not after the old 30-minute minimum."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hang = bin_dir / "llama-completion"
    hang.write_text("#!/bin/sh\nexec sleep 120\n")
    hang.chmod(0o755)
    tc = Toolchain(root=tmp_path, bin_dir=bin_dir, version="test", commit=None, cuda=False, origin="test")
    model = tiny_gguf(tmp_path / "m.gguf")
    ctx = job_context(tmp_path, limits=job.ToolLimits(min_seconds=2.0))
    errors: list[ToolError] = []

    class Generate:
        name, quiet = "generate", True

        def run(self, ctx: job.JobContext) -> None:
            try:
                verify.generate(tc, model, "Hello", n_predict=8)
            except ToolError as e:
                errors.append(e)

    t0 = time.monotonic()
    job.run_stages([Generate()], ctx)
    took = time.monotonic() - t0
    assert errors and errors[0].timed_out, errors
    assert took < 30, took


# ------------------------------------------------------------------------------------------ settings
def load(tmp_path: Path, text: str) -> S.Settings:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return S.load(p, env={})


def test_the_limits_come_from_the_settings(tmp_path: Path) -> None:
    s = load(tmp_path, "[limits]\ntool_min_seconds = 60\ntool_generate_seconds_per_token_gb = 0.5\n"
                       "tool_eval_seconds_per_token_gb = 0.2\ntool_load_seconds_per_gb = 10\n")
    limits = job.ToolLimits.from_settings(s.limits)
    assert limits == job.ToolLimits(seconds_per_gb=600.0, min_seconds=60.0, load_seconds_per_gb=10.0,
                                    eval_seconds_per_token_gb=0.2, generate_seconds_per_token_gb=0.5)
    assert limits.generation() == verify.ProgramLimit(60.0, 10.0, 0.5, 0.2)
    assert job.ToolLimits.from_settings(S.Limits()) == job.ToolLimits()  # one set of defaults


def test_the_bot_job_takes_every_limit_from_the_settings(tmp_path: Path) -> None:
    from bot.jobs.job import JobSpec

    s = load(tmp_path, "[limits]\ntool_min_seconds = 60\ntool_generate_seconds_per_token_gb = 0.5\n"
                       "tool_eval_seconds_per_token_gb = 0.2\ntool_load_seconds_per_gb = 10\n")
    spec = JobSpec.from_settings(s, "acme/Model", "a" * 40, calibration=None, evaluation=None)
    assert spec.limits == job.ToolLimits.from_settings(s.limits) != job.ToolLimits()


def test_old_keys_still_work(tmp_path: Path) -> None:
    s = load(tmp_path, "[limits]\ntool_seconds_per_gb = 300\ntool_min_seconds = 1800\n")
    limits = job.ToolLimits.from_settings(s.limits)
    assert limits.min_seconds == 1800 and limits.convert(int(2e9)) == 1800 + 600


@pytest.mark.parametrize("key", ["tool_min_seconds", "tool_load_seconds_per_gb", "tool_eval_seconds_per_token_gb",
                                 "tool_generate_seconds_per_token_gb", "tool_seconds_per_gb"])
def test_a_bad_limit_names_its_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.{key}"):
        load(tmp_path, f"[limits]\n{key} = 0\n")
    assert os.environ.get("GGUFBOT_LIMITS__" + key.upper()) is None
