"""`ggufbot convert` on bad input: one clear line, a non-zero exit, nothing half-written."""

import json
import shutil
from pathlib import Path

import pytest

from bot.cli import main
from tests.models import tiny_random_checkpoint

pytestmark = [pytest.mark.llama]


@pytest.fixture()
def tiny(tmp_path) -> Path:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_random_checkpoint("llama"), d)
    return d


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def damage_missing_config(d): (d / "config.json").unlink()
def damage_bad_config(d): (d / "config.json").write_text("{\"architectures\": [")
def damage_arch(d): edit_json(d / "config.json", architectures=["FancyNetForCausalLM"])
def damage_remote(d): edit_json(d / "config.json", auto_map={"AutoModelForCausalLM": "modeling.Fancy"})
def damage_no_tok(d): (d / "tokenizer.json").unlink()


def damage_pickle(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")


def damage_corrupt(d):
    p = d / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def damage_header(d):
    # a crafted header: the dtype is a list (unhashable), the shape a string
    raw = json.dumps({"w": {"dtype": ["F32"], "shape": "4x4", "data_offsets": [0, 64]}}).encode()
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


def damage_weight_map(d):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../secret.safetensors"}}))


BAD = [
    ("crafted safetensors header", damage_header, "unknown dtype ['F32']"),
    ("weight_map escape", damage_weight_map, "names unsafe files"),
    ("missing config", damage_missing_config, "no config.json"),
    ("malformed config", damage_bad_config, "malformed config.json"),
    ("unsupported architecture", damage_arch, "FancyNetForCausalLM is not supported"),
    ("remote code", damage_remote, "trust_remote_code"),
    ("pickle only", damage_pickle, "pickle"),
    ("corrupt safetensors", damage_corrupt, "corrupt safetensors"),
    ("no tokenizer", damage_no_tok, "no tokenizer"),
]


@pytest.mark.parametrize("name,damage,text", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoints(name, damage, text, tiny, tmp_path, capsys, calibration_text, toolchain):
    damage(tiny)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, tiny, "--out", out, "--ladder", "Q8_0", "--calibration", calibration_text, "--no-eval")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err
    assert not out.exists() or not list(out.rglob("*.gguf"))


@pytest.mark.parametrize("ladder,text", [("Q4_K_M,Q9_X", "unknown quant type 'Q9_X'"),
                                         ("Q4_K_M,IQ2_XS", "IQ2_XS needs an importance matrix")])
def test_bad_ladders(ladder, text, tiny, tmp_path, capsys, toolchain):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, tiny, "--out", out, "--ladder", ladder, "--no-imatrix", "--no-eval")
    assert code == 1 and text in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not list(out.rglob("*.gguf"))


def test_too_little_disk_is_refused_before_writing(tiny, tmp_path, capsys, monkeypatch, calibration_text, toolchain):
    import converters.core.stages as stages

    monkeypatch.setattr(stages, "free_bytes", lambda path: 1_000_000)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, tiny, "--out", out, "--ladder", "Q8_0", "--calibration", calibration_text, "--no-eval")
    assert code == 1 and "not enough free disk" in err
    assert not list(out.rglob("*.gguf"))


def test_calibration_text_too_short(tiny, tmp_path, capsys, toolchain):
    tiny_text = tmp_path / "short.txt"
    tiny_text.write_text("Too short to calibrate anything.\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, tiny, "--out", out, "--ladder", "Q8_0", "--calibration", tiny_text, "--no-eval")
    assert code == 1 and "too short" in err
    # enough bytes for the quick check, too few tokens for one chunk: llama-imatrix's count is reported
    words = tmp_path / "words.txt"
    words.write_text("tokenization " * 100)  # 1300 bytes, ~200 tokens < 2 x 512
    code, _, err = run_cli(capsys, tiny, "--out", out, "--ladder", "Q8_0", "--calibration", words, "--no-eval")
    assert code == 1 and "too short" in err and "tokens" in err
    assert not list(out.glob("*Q8_0*")) and not list(out.rglob(".partial-*"))


def test_unknown_source(tmp_path, capsys, toolchain):
    code, _, err = run_cli(capsys, tmp_path / "nope" / "x" / "y", "--out", tmp_path / "o", "--no-eval")
    assert code == 1 and "neither a folder nor a Hub repo id" in err


def test_dry_run_prints_the_plan(tiny, tmp_path, capsys, calibration_text, toolchain):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, tiny, "--out", out, "--ladder", "Q8_0,Q4_K_M", "--calibration",
                              calibration_text, "--dry-run")
    assert code == 0
    assert "tiny-Q8_0.gguf" in stdout and "tiny-Q4_K_M.gguf" in stdout and "disk" in stdout
    assert not out.exists() or not list(out.rglob("*.gguf"))


def test_toolchain_info_and_doctor(capsys, toolchain):
    assert main(["toolchain", "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == toolchain.version and info["missing"] == [] and info["cuda"] in (True, False)
    assert main(["toolchain", "install"]) == 0  # already built: a no-op that says so
    assert "ready" in capsys.readouterr().out
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert toolchain.version in out and "free disk" in out and "transformers" in out and "all set" in out


@pytest.mark.slow
def test_the_summary_shows_the_measured_figures_and_why_a_file_was_refused(tiny, tmp_path, capsys, calibration_text,
                                                                          eval_text, toolchain):
    from bot.commands import figures
    from converters.core.workdir import WorkDir

    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, tiny, "--out", out, "--ladder", "Q8_0,Q2_K", "--calibration", calibration_text,
                              "--calibration-chunks", "2", "--ctx", "128", "--eval-text", eval_text,
                              "--eval-chunks", "2")
    assert code == 0
    report = WorkDir(out).report()
    rows = {line.split()[0]: line for line in stdout.splitlines()[2:] if line.split() and line.split()[0] in
            {f.type for f in report.files}}
    assert "mean KLD" in stdout.splitlines()[1] and "same top token" in stdout.splitlines()[1]
    for f in report.files:
        kld, top, _ = figures(f.stats)
        assert f.stats is not None and kld in rows[f.type] and top in rows[f.type] and f.status in rows[f.type]
        for reason in (f.reasons if f.status != "passed" else ()):
            assert f"    - {reason}" in stdout
