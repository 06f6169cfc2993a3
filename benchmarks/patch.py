"""A template-only upstream revision as a metadata patch vs the full job, on SmolLM2-135M-Instruct.

The bot's runner (real store, real huggingface_hub client, the local Hub-compatible server, the pinned llama.cpp)
publishes SmolLM2 with a full job, then a new upstream revision changes only ``chat_template.jinja`` and the
runner publishes it as a metadata patch. Prints JSON: both jobs' wall times (claim to published), their ratio,
the patch's stage times, and whether the tensor data of every published file is byte-identical.

    .venv/bin/python benchmarks/patch.py [--ladder Q8_0,Q4_K_M] [--calibration-chunks 8] [--eval-chunks 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hubserver import free_port, point_client_here  # noqa: E402  (no Hub client imported by it)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ladder", default="Q8_0,Q4_K_M")
    ap.add_argument("--calibration-chunks", type=int, default=8)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    data = ROOT.parent / "shared" / "data"
    ap.add_argument("--calibration-text", type=Path, default=data / "groups_merged.txt")
    ap.add_argument("--eval-text", type=Path, default=data / "wiki.test.raw")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ggufbot-bench-patch-"))
    token = "hf_benchmarktoken000000"
    port = free_port()
    point_client_here(port, tmp / "hf", token)
    from bot.hub.client import Hub  # noqa: E402 - after the environment
    from bot.service.runner import Runner
    from bot.model.settings import from_mapping
    from bot.state.store import Store
    from bot.model.revisions import fingerprint
    from converters.patch import metapatch
    from converters.llama import toolchain as tc_mod
    from tests.bot_fixtures import checkpoint_files
    from tests.hubserver import HubServer
    from tests.models import smollm2_checkpoint

    ckpt = smollm2_checkpoint()
    repo, target = "HuggingFaceTB/SmolLM2-135M-Instruct", "bench/SmolLM2-135M-Instruct-GGUF"
    try:
        with HubServer(valid_tokens={token: "bench"}, user_orgs={"bench": []}, port=port) as server:
            settings = from_mapping({
                "data_dir": str(tmp / "data"), "sources": [{"author": "HuggingFaceTB"}],
                "limits": {"max_model_gb": 2.0, "min_free_disk_gb": 0.0},
                "quantize": {"ladder": args.ladder, "calibration_text": str(args.calibration_text),
                             "evaluation_text": str(args.eval_text),
                             "calibration_chunks": args.calibration_chunks, "evaluation_chunks": args.eval_chunks,
                             "ctx": args.ctx}}, env={"HF_TOKEN": token}, free_disk=10**13)
            store = Store(settings.database_url)
            hub = Hub()
            runner = Runner(settings, store, hub, worker_id="bench", toolchain=tc_mod.find(required=True))
            cfg = json.loads((ckpt / "config.json").read_text())
            sha = server.add_model(repo, checkpoint_files(ckpt), config=cfg, card_data={"license": "apache-2.0"},
                                   pipeline_tag="text-generation", safetensors_params=134_515_008)

            def run(rev: str, now: float):
                jid = store.enqueue(repo, rev, reason="bench", now=now,
                                    fingerprint=fingerprint(hub.model_info(repo, revision=rev)))
                t0 = time.perf_counter()
                out = runner.run_one(now=now)
                seconds = time.perf_counter() - t0
                job = store.job(jid)
                if out is None or out.status.value != "published":
                    raise SystemExit(f"job {jid} did not publish: {job.status} {job.error_type} {job.error_message}")
                return job, seconds

            full_job, full_s = run(sha, 10.0)
            q = args.ladder.split(",")[0]
            name = f"SmolLM2-135M-Instruct-{q}.gguf"
            before = server.files(target)[name]
            tpl_path = ckpt / "chat_template.jinja"
            if tpl_path.exists():
                files = {"chat_template.jinja": tpl_path.read_text() + "{#- fixed upstream -#}\n"}
            else:
                tc = json.loads((ckpt / "tokenizer_config.json").read_text())
                tc["chat_template"] = tc["chat_template"] + "{#- fixed upstream -#}\n"
                files = {"tokenizer_config.json": json.dumps(tc, indent=2)}
            new = server.add_commit(repo, files, message="fix the chat template")
            patch_job, patch_s = run(new, 20.0)
            after = server.files(target)[name]
            (tmp / "a.gguf").write_bytes(before)
            (tmp / "b.gguf").write_bytes(after)
            same = metapatch.tensor_data_sha256(tmp / "a.gguf") == metapatch.tensor_data_sha256(tmp / "b.gguf")
            stages = {}
            for e in reversed(store.events(job_id=patch_job.id, limit=200)):
                if e["kind"] in ("stage.end", "stage.skip") and isinstance(e.get("data"), dict):
                    sec = e["data"].get("seconds")
                    if sec is not None:
                        stages[e["message"].split()[0]] = round(float(sec), 2)
            print(json.dumps({
                "model": "SmolLM2-135M-Instruct", "ladder": args.ladder,
                "calibration_chunks": args.calibration_chunks, "eval_chunks": args.eval_chunks, "ctx": args.ctx,
                "full_job": {"kind": full_job.result.get("kind"), "seconds": round(full_s, 1)},
                "template_patch_job": {"kind": patch_job.result.get("kind"), "reason": patch_job.result.get("kind_reason"),
                                       "seconds": round(patch_s, 1), "stage_seconds": stages},
                "patch_over_full": round(patch_s / full_s, 3),
                "tensor_data_identical": same, "file_bytes_differ": before != after,
                "cpus": os.cpu_count(),
            }, indent=2))
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
