"""Speed: llama-bench's output parser (a recorded run of this project's build), the interleaved measurement of a
tuned file and its baseline, speed.json into the report and the gate, the card's table, the settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bot.model import settings as S
from bot.publish import speed_card
from converters.core import names
from converters.core.errors import ConfigError, ParseError, ToolError
from converters.core.hooks import NULL_HOOKS
from converters.core.report import FAILED, PASSED
from converters.core.workdir import WorkDir
from converters.ladder import evaluate, speed
from converters.llama import bench
from converters.llama.toolchain import Toolchain
from tests.workdirs import make_workdir

DATA = Path(__file__).parent / "data"


def test_parse_a_recorded_llama_bench_run():
    # llama-bench -m SmolLM2 (Q4_1) -p 64 -n 8 -r 2 -t 2 -o json, on this project's CPU build (path masked)
    run = bench.parse((DATA / "llama_bench_pp64_tg8.json").read_text())
    assert (run.prompt, run.generate, run.threads, run.backend) == (64, 8, 2, "CPU")
    assert run.pp.samples == (9.43409, 14.2096) and run.tg.samples == (11.4784, 7.47427)
    assert run.pp.mean == pytest.approx(11.821845)  # llama-bench's own avg_ts
    assert run.pp.err == pytest.approx(3.376796 / 2 ** 0.5, rel=1e-4)  # its stddev_ts / sqrt(runs)
    assert run.device == "AMD EPYC (CPU)"


@pytest.mark.parametrize("text,why", [
    ("", "no test results"),
    ("main: error\n[{", "no JSON array"),
    ("[]", "no test results"),
    ('[{"n_prompt": 64, "n_gen": 0, "samples_ts": [1.0]}]', "0 generation tests"),
    ('[{"n_prompt": 64, "n_gen": 0, "samples_ts": [0]}, {"n_prompt": 0, "n_gen": 8, "samples_ts": [1]}]',
     "not positive"),
])
def test_parse_refuses_what_is_not_a_result(text, why):
    with pytest.raises(ParseError, match=why):
        bench.parse(text)


def test_argv(tmp_path):
    (tmp_path / "llama-bench").write_text("")
    tc = Toolchain(root=tmp_path, bin_dir=tmp_path, version="test", commit=None, cuda=False, origin="dir")
    assert bench.argv(tc, Path("m.gguf"), prompt=512, generate=128, repetitions=3, n_threads=4)[1:] == \
        ["-m", "m.gguf", "-p", "512", "-n", "128", "-r", "3", "-t", "4", "-o", "json"]


class FakeBench:
    """llama-bench stand-in: tokens/s per file name (a slow tuned file), every call recorded in order."""

    def __init__(self, rates: dict[str, float], fail: str | None = None):
        self.rates, self.fail, self.calls = rates, fail, []

    def __call__(self, tc, model: Path, *, prompt, generate, repetitions, n_threads=None, timeout=None):
        self.calls.append(model.name)
        if self.fail and self.fail in model.name:
            raise ToolError(["llama-bench"], 1, "failed to load model")
        r = next(v for k, v in self.rates.items() if model.name.endswith(f"-{k}.gguf"))
        drift = 1.0 - 0.01 * len(self.calls)  # the machine gets slower: interleaving spreads it over both
        t = bench.Throughput(tuple(r * drift * (1 + d) for d in (-0.005, 0.0, 0.005)[:repetitions]))
        return bench.BenchRun(prompt, generate, pp=t, tg=t, threads=2, backend="CPU", device="Test CPU (CPU)",
                              build="x")


@dataclasses.dataclass
class Ctx:
    workdir: Path
    toolchain: Toolchain
    ladder: object
    hooks: object = NULL_HOOKS

    def tool_timeout(self):
        return None


def _workdir(tmp_path, types=("Q8_0", "Q4_K_M", "Q4_K_M-tuned", "Q2_K")):
    wd = make_workdir(tmp_path, types=types)
    tc = Toolchain(root=tmp_path, bin_dir=tmp_path, version="test", commit=None, cuda=False, origin="dir")
    return WorkDir(wd), tc


def test_a_pair_is_interleaved_and_its_ratio_measured(tmp_path, monkeypatch):
    wd, tc = _workdir(tmp_path)
    fake = FakeBench({"Q8_0": 100.0, "Q4_K_M": 200.0, "Q4_K_M-tuned": 180.0, "Q2_K": 300.0})
    monkeypatch.setattr(bench, "run", fake)
    out = speed.measure(wd.path, wd.ladder(), speed.SpeedOptions(scope="tuned", rounds=3), toolchain=tc)
    assert [c.split("-", 2)[-1] for c in fake.calls] == ["Q4_K_M.gguf", "Q4_K_M-tuned.gguf"] * 1 + \
        ["Q4_K_M-tuned.gguf", "Q4_K_M.gguf"] + ["Q4_K_M.gguf", "Q4_K_M-tuned.gguf"]  # B A, A B, B A
    assert sorted(out) == ["Q4_K_M", "Q4_K_M-tuned"]  # scope "tuned": the pair only
    vs = out["Q4_K_M-tuned"]["vs"]
    assert vs["baseline"] == "Q4_K_M" and vs["tg"]["ratio"] == pytest.approx(0.9, abs=0.004)  # the drift (9 %) cancels
    assert out["Q4_K_M"]["tg"]["runs"] == 9 and out["Q4_K_M"]["device"] == "Test CPU (CPU)"
    fake.calls.clear()
    out = speed.measure(wd.path, wd.ladder(), speed.SpeedOptions(scope="all", rounds=1), toolchain=tc)
    assert sorted(out) == ["Q2_K", "Q4_K_M", "Q4_K_M-tuned", "Q8_0"] and len(fake.calls) == 4


def test_the_stage_writes_speed_json_the_gate_withholds_a_slow_tuned_file_and_the_card_shows_the_rest(
        tmp_path, monkeypatch):
    wd, tc = _workdir(tmp_path)
    fake = FakeBench({"Q8_0": 100.0, "Q4_K_M": 200.0, "Q4_K_M-tuned": 180.0, "Q2_K": 300.0})
    monkeypatch.setattr(bench, "run", fake)
    stage = speed.SpeedStage(speed.SpeedOptions(scope="tuned", rounds=2, repetitions=3))
    stage.run(Ctx(wd.path, tc, wd.ladder()))
    assert len(fake.calls) == 4
    stage.run(Ctx(wd.path, tc, wd.ladder()))  # recorded: a re-run is free
    assert len(fake.calls) == 4
    data = json.loads((wd.path / names.SPEED).read_text())
    assert data["options"]["scope"] == "tuned" and data["files"]["Q4_K_M-tuned"]["vs"]["tg"]["ratio"] < 0.95

    report = wd.report()
    files = report.files
    for f in files:  # the content the evaluation measured
        f.sha256 = wd.ladder().file(f.type).sha256
    assert speed.attach(wd.path, files) is True
    tuned, stock = (next(f for f in files if f.type == t) for t in ("Q4_K_M-tuned", "Q4_K_M"))
    assert stock.extra["speed"]["tg"]["tokens_per_s"] > tuned.extra["speed"]["tg"]["tokens_per_s"]
    assert next(f for f in files if f.type == "Q8_0").extra.get("speed") is None  # not asked for
    why = evaluate.verdict.tuned_reasons(files, speed_required=True)["Q4_K_M-tuned"]
    assert "generation is 10.0 ± " in why and "% slower than Q4_K_M" in why

    for f in files:
        f.status = FAILED if f.type == "Q4_K_M-tuned" else PASSED
    section = speed_card.speed_section(wd.ladder(), report)
    assert [r["type"] for r in section["rows"]] == ["Q4_K_M"] and section["device"] == r"Test CPU \(CPU\)"
    assert section["rows"][0]["tg"].startswith("19") and section["prompt"] == 512

    tuned.sha256 = "0" * 64  # figures of other content are never attached
    speed.attach(wd.path, files)
    assert "speed" not in tuned.extra


def test_a_file_llama_bench_cannot_run_has_no_figures_and_its_candidate_none(tmp_path, monkeypatch):
    wd, tc = _workdir(tmp_path)
    monkeypatch.setattr(bench, "run", FakeBench({"Q4_K_M": 200.0, "Q4_K_M-tuned": 180.0}, fail="tuned"))
    out = speed.measure(wd.path, wd.ladder(), speed.SpeedOptions(), toolchain=tc)
    assert "failed to load model" in out["Q4_K_M-tuned"]["error"] and "vs" not in out["Q4_K_M-tuned"]


def test_settings():
    s = S.from_mapping({"evaluate": {"speed": "all", "speed_rounds": 3}}, env={}, free_disk=10**12)
    from bot.jobs.job import speed_options
    assert speed_options(s) == speed.SpeedOptions(scope="all", prompt=512, generate=128, repetitions=3, rounds=3)
    s = S.from_mapping({"evaluate": {"speed_threads": 1}}, env={}, free_disk=10**12)
    assert speed_options(s).threads == 1 and speed_options(s).scope == "tuned"
    assert S.from_mapping({}, env={}, free_disk=10**12).evaluate.speed == "tuned"
    with pytest.raises(ConfigError, match="evaluate.speed"):
        S.from_mapping({"evaluate": {"speed": "some"}}, env={}, free_disk=10**12)
    with pytest.raises(ConfigError, match="evaluate.speed_repetitions"):
        S.from_mapping({"evaluate": {"speed_repetitions": 0}}, env={}, free_disk=10**12)


def test_save_merges_pair_by_pair(tmp_path):
    opts = speed.SpeedOptions()
    speed.save(tmp_path, opts, {"Q4_K_M": {"sha256": "a"}, "Q4_K_M-tuned": {"sha256": "b"}}, 10.0)
    speed.save(tmp_path, opts, {"Q2_K": {"sha256": "c"}, "Q2_K-tuned": {"sha256": "d"}}, 5.0)
    data = json.loads((tmp_path / names.SPEED).read_text())
    assert sorted(data["files"]) == ["Q2_K", "Q2_K-tuned", "Q4_K_M", "Q4_K_M-tuned"] and data["seconds"] == 15.0
    speed.save(tmp_path, dataclasses.replace(opts, rounds=4), {"Q2_K": {"sha256": "c"}}, 1.0)  # other settings
    assert sorted(json.loads((tmp_path / names.SPEED).read_text())["files"]) == ["Q2_K"]


def test_the_card_shows_tokens_per_second_with_the_device(tmp_path, monkeypatch):
    from bot.publish import card, source_card

    wd, tc = _workdir(tmp_path)
    monkeypatch.setattr(bench, "run", FakeBench({"Q8_0": 100.0, "Q4_K_M": 200.0, "Q4_K_M-tuned": 199.0,
                                                 "Q2_K": 300.0}))
    speed.SpeedStage(speed.SpeedOptions(scope="all", rounds=2, repetitions=3)).run(Ctx(wd.path, tc, wd.ladder()))
    ladder, report = wd.ladder(), wd.report()
    for f in report.files:
        f.sha256 = ladder.file(f.type).sha256
    speed.attach(wd.path, report.files)
    facts = source_card.SourceFacts.from_checkpoint(Path(ladder.source.path), repo=ladder.source.repo,
                                                    revision=ladder.source.revision)
    text = card.render(card.build_context(ladder, report, facts, card.CardSettings(
        repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")))
    assert r"Speed on Test CPU \(CPU\) (2 threads, llama.cpp's `llama-bench`)" in text
    assert "512-token prompt and generating 128 tokens" in text
    row = next(line for line in text.splitlines() if line.startswith("| Tiny-Instruct-Q4_K_M-tuned.gguf |"))
    assert row.startswith("| Tiny-Instruct-Q4_K_M-tuned.gguf | Q4_K_M-tuned | 19") and "vs Q4_K_M: pp " in row
    for t in ("Q8_0", "Q4_K_M", "Q2_K"):  # scope "all": every published file has its row
        assert any(line.startswith(f"| Tiny-Instruct-{t}.gguf | {t} | ") for line in text.splitlines())


def test_the_speed_stage_runs_before_the_evaluation_when_asked():
    from converters.ladder import job, pipeline
    from converters.llama.calibrate import TextFile

    text = TextFile(Path("e.txt"), "e", "t", "0" * 64, 0)
    opts = pipeline.LadderOptions(ladder="small", imatrix=False, pipeline=False)
    stages = [s.name for s in job.ladder_stages(opts, job.EvalSettings(text, speed=speed.SpeedOptions()))]
    assert stages[-2:] == ["speed", "evaluate"]
    assert "speed" not in [s.name for s in job.ladder_stages(opts, job.EvalSettings(text))]
    # the pipeline stage runs it as one of its tasks (converters.ladder.flow: after the makes, before the tuned
    # files' measurements)
    piped = job.ladder_stages(dataclasses.replace(opts, pipeline=True), job.EvalSettings(text, speed=speed.SpeedOptions()))
    assert piped[-1].name == "ladder" and piped[-1].settings.speed == speed.SpeedOptions()
