"""What ggufbot publishes for SmolLM2, as a manifest to compare across code changes.

Runs the two publishing paths against a local Hub-compatible server (``tests/hubserver.py``), with the real
``huggingface_hub`` client and the real llama.cpp toolchain:

- ``ggufbot convert ORG/NAME --publish`` (fetch from the Hub, ladder, evaluation, publish), and
- the bot: ``ggufbot enqueue ORG/NAME`` then ``ggufbot run --no-poll --exit-when-idle``.

Prints JSON: for each published repo, the sha256 of every file, and the card and ``report.json`` with their
volatile parts (dates, timings, commit shas, the local work path) masked. ``--dump DIR`` also writes the
masked cards and reports there, so two runs can be compared with ``diff -r``.

    .venv/bin/python benchmarks/golden.py --dump /tmp/golden-before > before.json
    ... change the code ...
    .venv/bin/python benchmarks/golden.py --dump /tmp/golden-after > after.json
    diff before.json after.json && diff -r /tmp/golden-before /tmp/golden-after
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.hub_fixtures import ENDPOINT, TEST_ORG, TEST_USER, default_tokens  # noqa: E402  (sets HF_ENDPOINT)
from tests.hubserver import HubServer  # noqa: E402

AUTHOR = "smol-labs"
LADDER = "Q8_0,Q4_K_M,IQ4_XS,Q2_K"

# what changes from one run to the next without the code changing: dates, durations, commit ids, temp paths
_VOLATILE = [
    (re.compile(re.escape(ENDPOINT)), "<hub>"),  # the test server's port changes from run to run
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?Z?"), "<date>"),
    (re.compile(r"\d{4}-\d\d-\d\d"), "<day>"),
    (re.compile(r"\b[0-9a-f]{40}\b"), "<sha>"),
    (re.compile(re.escape(tempfile.gettempdir()) + r"/[^\s\"')]+"), "<tmp>"),
]
_TIME_KEYS = {"seconds", "elapsed", "duration", "created_at", "date", "wall_seconds", "started_at", "finished_at"}


def mask(text: str) -> str:
    for rx, rep in _VOLATILE:
        text = rx.sub(rep, text)
    return text


def mask_json(value):
    if isinstance(value, dict):
        return {k: ("<time>" if k in _TIME_KEYS or k.endswith("_seconds") else mask_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_json(v) for v in value]
    if isinstance(value, str):
        return mask(value)
    return value


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"{' '.join(cmd[2:5])}... rc={r.returncode} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-5000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return r


def manifest(hub: HubServer, repo_id: str, dump: Path | None) -> dict:
    files = hub.files(repo_id)
    out: dict = {"files": {}}
    for name, data in sorted(files.items()):
        if name in ("README.md", "report.json"):
            continue
        out["files"][name] = hashlib.sha256(data).hexdigest()
    card = mask(files["README.md"].decode())
    report = mask_json(json.loads(files["report.json"])) if "report.json" in files else None
    out["card_sha256"] = hashlib.sha256(card.encode()).hexdigest()
    out["report_sha256"] = hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
    if dump is not None:
        d = dump / repo_id.replace("/", "__")
        d.mkdir(parents=True, exist_ok=True)
        (d / "README.md").write_text(card)
        (d / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", type=Path, help="write the masked cards and reports here")
    ap.add_argument("--no-bot", action="store_true", help="only the convert --publish path")
    ap.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                    help="folder with groups_merged.txt and wiki.test.raw (default: ../shared/data)")
    args = ap.parse_args()

    from tests.models import smollm2_checkpoint

    ckpt = smollm2_checkpoint()
    data = args.data
    cal, ev = data / "groups_merged.txt", data / "wiki.test.raw"
    model = ckpt.name
    source = f"{AUTHOR}/{model}"
    hub = HubServer(valid_tokens=default_tokens(), user_orgs={TEST_USER: [TEST_ORG]},
                    port=int(ENDPOINT.rsplit(":", 1)[1]))
    hub.start()
    result: dict = {}
    try:
        files = {p.name: p for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != "README.md"}
        cfg = json.loads((ckpt / "config.json").read_text())
        hub.add_model(source, files, card_data={"license": "apache-2.0", "pipeline_tag": "text-generation",
                                                "library_name": "transformers"},
                      config=cfg, safetensors_params=134_515_008, pipeline_tag="text-generation",
                      library_name="transformers")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        py = [sys.executable, "-m", "bot.cli"]
        with tempfile.TemporaryDirectory(prefix="ggufbot-golden-") as tmp:
            tmp_p = Path(tmp)
            cli_repo = f"{TEST_USER}/{model}-GGUF"
            run(py + ["convert", source, "--out", str(tmp_p / "work"), "--ladder", LADDER,
                      "--calibration", str(cal), "--calibration-chunks", "8", "--ctx", "256", "--eval-text", str(ev),
                      "--eval-chunks", "8", "--jobs", "2", "--publish", "--repo", cli_repo], env, 3600)
            result["convert --publish"] = {cli_repo: manifest(hub, cli_repo, args.dump)}
            if not args.no_bot:
                config = tmp_p / "ggufbot.toml"
                config.write_text(f"""
data_dir = "{tmp_p / 'data'}"

[[sources]]
author = "{AUTHOR}"

[limits]
max_model_gb = 1.0
min_free_disk_gb = 0.1

[target]
namespace = "{TEST_ORG}"

[quantize]
ladder = "{LADDER}"
calibration_text = "{cal}"
evaluation_text = "{ev}"
calibration_chunks = 8
evaluation_chunks = 8
ctx = 256
jobs = 2
""")
                run(py + ["enqueue", source, "--config", str(config)], env, 600)
                run(py + ["run", "--no-poll", "--exit-when-idle", "--config", str(config)], env, 3600)
                bot_repo = f"{TEST_ORG}/{model}-GGUF"
                result["bot run"] = {bot_repo: manifest(hub, bot_repo, args.dump)}
    finally:
        hub.stop()
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
