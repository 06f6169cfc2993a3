"""Publishing throughput against the local Hub-compatible server, with the real huggingface_hub client.

Builds a work directory of placeholder quants (``--mb`` megabytes each, random bytes) or takes the
``.gguf`` files given with ``--files``, publishes it (one commit), publishes it again (must be a no-op)
and prints JSON: bytes, seconds, MB/s, requests made. It measures the client, the publish planner
(hashing) and the local server, not a network.

    .venv/bin/python benchmarks/publish.py --mb 100 --types Q8_0,Q4_K_M,Q2_K
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
    ap.add_argument("--mb", type=float, default=50.0, help="size of each placeholder quant (MB)")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K", help="quant types (placeholders)")
    ap.add_argument("--files", nargs="*", type=Path, help="real .gguf files to publish instead of placeholders")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ggufbot-bench-publish-"))
    token = "hf_benchmarktoken000000"
    port = free_port()
    point_client_here(port, tmp / "hf", token)
    from bot.hub.client import Hub  # noqa: E402 - after the environment
    from bot.publish.commit import PublishOptions, publish
    from converters.core.workdir import WorkDir
    from tests.hubserver import HubServer
    from tests.workdirs import make_workdir

    types = [t for t in args.types.split(",") if t]
    if args.files:
        types = [f.stem.rsplit("-", 1)[-1] for f in args.files]
    try:
        with HubServer(valid_tokens={token: "bench"}, user_orgs={"bench": ["bench-org"]}, port=port) as server:
            rev = server.add_model("acme/Tiny-Instruct", {"config.json": b"{}"}, card_data={"license": "mit"})
            wd = make_workdir(tmp, revision=rev, types=types)
            ladder = json.loads((wd / "ladder.json").read_text())
            for i, f in enumerate(ladder["files"]):
                p = wd / f["path"]
                if args.files:
                    shutil.copyfile(args.files[i], p)
                else:
                    with open(p, "wb") as out:
                        out.write(os.urandom(int(args.mb * 1e6)))
                f["size"] = p.stat().st_size
                f["sha256"] = None  # hashed by the publisher, as part of the measurement
            (wd / "ladder.json").write_text(json.dumps(ladder))
            w = WorkDir(wd)  # the evaluation's record of the files: publishing refuses files it did not measure
            report = w.report()
            report.file_hashes.update(w.content(w.ladder()))  # the chart keeps its entry
            w.write_report(report)
            total = sum((wd / f["path"]).stat().st_size for f in ladder["files"])
            hub = Hub()
            t0 = time.perf_counter()
            _, first = publish(wd, hub, PublishOptions(namespace="bench-org"))
            t1 = time.perf_counter()
            n_requests = len(server.requests)
            _, second = publish(wd, hub, PublishOptions(namespace="bench-org"))
            t2 = time.perf_counter()
            print(json.dumps({
                "files": len(types), "bytes": total, "publish_seconds": round(t1 - t0, 3),
                "publish_mb_per_s": round(total / 1e6 / (t1 - t0), 1), "publish_requests": n_requests,
                "first_action": first.action if first else None,
                "republish_seconds": round(t2 - t1, 3), "republish_action": second.action if second else None,
                "republish_requests": len(server.requests) - n_requests,
            }, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
