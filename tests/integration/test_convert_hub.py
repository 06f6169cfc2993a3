"""`ggufbot convert ORG/NAME`: the source and the calibration text come through the real Hub client
from the local Hub-compatible server; only the files that matter are downloaded."""

import json

import pytest

from bot.cli import main
from tests.models import tiny_random_checkpoint

pytestmark = [pytest.mark.llama]


@pytest.fixture()
def hub_with_model(hub_server, calibration_text):
    src = tiny_random_checkpoint("llama")
    files = {p.name: p for p in src.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"\x80\x04 not to be downloaded"  # pickle beside safetensors: ignored
    files["extra/notes.txt"] = "not needed for conversion"
    config = json.loads((src / "config.json").read_text())
    sha = hub_server.add_model("someorg/TinyLlama", files, config=config, safetensors_params=1000,
                               card_data={"license": "apache-2.0"}, pipeline_tag="text-generation")
    hub_server.add_dataset("someorg/calib", {"texts/cal.txt": calibration_text})
    return sha


def test_convert_from_the_hub(hub_server, hub_with_model, tmp_path, capsys, toolchain):
    out = tmp_path / "work"
    code = main(["convert", "someorg/TinyLlama", "--out", str(out), "--ladder", "Q8_0",
                 "--calibration", "hf://datasets/someorg/calib/texts/cal.txt", "--calibration-chunks", "2", "--ctx", "128",
                 "--no-eval"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    got = sorted(p.name for p in (out / "source").rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert "pytorch_model.bin" not in got and "notes.txt" not in got
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["source"]["repo"] == "someorg/TinyLlama" and ladder["source"]["revision"] == hub_with_model
    assert ladder["imatrix"]["calibration"]["name"] == "cal.txt"
    assert ladder["imatrix"]["calibration"]["source"] == "hf://datasets/someorg/calib/texts/cal.txt"
    assert "TinyLlama-Q8_0.gguf" in stdout


def test_dry_run_downloads_nothing(hub_server, hub_with_model, tmp_path, capsys, calibration_text, toolchain):
    hub_server.clear_log()
    code = main(["convert", "someorg/TinyLlama", "--out", str(tmp_path / "w"), "--ladder", "Q8_0,Q4_K_M",
                 "--calibration", str(calibration_text), "--dry-run"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "TinyLlama-Q4_K_M.gguf" in stdout and "someorg/TinyLlama" in stdout
    assert hub_server.count(contains="/resolve/") == 0


def test_missing_repo_is_a_clear_error(hub_server, tmp_path, capsys, calibration_text, toolchain):
    code = main(["convert", "someorg/Nope", "--out", str(tmp_path / "w"), "--calibration", str(calibration_text),
                 "--no-eval"])
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: ") and "someorg/Nope" in err
