"""Benchmark one poll of the watcher: a local Hub-compatible server holding 10,000 models from 500 authors,
200 of them watched. Prints JSON: poll seconds, Hub requests made, decisions per second, database size, and a
second poll's figures (which must make no request for a model already decided at the same commit).

Target: the first poll in under 10 s on the project's 2-core machine.

    .venv/bin/python benchmarks/watch.py [--authors 500] [--per-author 20] [--watched 200] [--accepted-per-author 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.hubserver import free_port, point_client_here  # noqa: E402  (no Hub client imported by it)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", type=int, default=500)
    ap.add_argument("--per-author", type=int, default=20)
    ap.add_argument("--watched", type=int, default=200)
    ap.add_argument("--accepted-per-author", type=int, default=3,
                    help="models per author that pass every listing rule (each costs one model_info request)")
    args = ap.parse_args()

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ggufbot-bench-watch-"))
    token = "hf_benchtoken0123456789"
    point_client_here(port, tmp / "hf", token)  # the client reads these at import time

    from bot.hub.client import Hub
    from bot.model.settings import from_mapping
    from bot.state.store import Store
    from bot.service.watcher import Watcher
    from tests.hubserver import HubServer

    server = HubServer(valid_tokens={token: "bench"}, port=port)
    server.page_size = 100
    server.start()
    t0 = time.monotonic()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    remote = {**cfg, "auto_map": {"AutoModelForCausalLM": "m.X"}}
    small = {"config.json": json.dumps(cfg), "model.safetensors": b"\0" * 64, "tokenizer.json": "{}"}
    tg = {"pipeline_tag": "text-generation", "card_data": {"license": "apache-2.0"}}
    kinds = ["ok"] * args.accepted_per_author + ["gguf", "awq", "pickle", "remote", "huge", "gptq-cfg"]
    for a in range(args.authors):
        author = f"org{a:03d}"
        for i in range(args.per_author):
            kind = kinds[i] if i < len(kinds) else ("gguf" if i % 2 else "pickle")
            name = f"{author}/Model{i:02d}-{kind}"
            if kind == "ok":
                server.add_model(name, small, config=cfg, safetensors_params=1_000_000_000, **tg)
            elif kind == "gguf":
                server.add_model(name + "-GGUF", {"m-Q4_K_M.gguf": b"GGUF"}, **tg)
            elif kind == "awq":
                server.add_model(name + "-AWQ", small, config=cfg, **tg)
            elif kind == "pickle":
                server.add_model(name, {"config.json": json.dumps(cfg), "pytorch_model.bin": b"\x80"}, config=cfg, **tg)
            elif kind == "remote":
                server.add_model(name, small, config=remote, **tg)
            elif kind == "huge":
                server.add_model(name, small, config=cfg, safetensors_params=900_000_000_000, **tg)
            else:
                server.add_model(name, small, config={**cfg, "quantization_config": {"quant_method": "gptq"}}, **tg)
    setup_s = time.monotonic() - t0

    watched = [{"author": f"org{a:03d}"} for a in range(args.watched)]
    settings = from_mapping({"data_dir": str(tmp / "data"), "sources": watched, "limits": {"max_model_gb": 100}},
                            env={"HF_TOKEN": token}, free_disk=10**13)
    store = Store(settings.database_url)
    watcher = Watcher(settings, store, Hub(token=token, endpoint=server.url))

    # time spent inside the test server's request handler (it serialises requests under one lock): the part of
    # the poll that is the local server's cost, not the bot's
    busy = [0.0]
    route = server._route

    def timed_route(*a, **kw):
        t1 = time.perf_counter()
        try:
            return route(*a, **kw)
        finally:
            busy[0] += time.perf_counter() - t1

    server._route = timed_route  # type: ignore[method-assign]

    server.clear_log()
    t = time.monotonic()
    res = watcher.poll(now=time.time())
    first_busy, busy[0] = busy[0], 0.0
    first_s = time.monotonic() - t
    first_requests = len(server.requests)
    first_info = sum(1 for _, p in server.requests if p.startswith("/api/models/"))

    server.clear_log()
    t = time.monotonic()
    res2 = watcher.poll(now=time.time())
    second_s = time.monotonic() - t
    second_requests = len(server.requests)
    second_info = sum(1 for _, p in server.requests if p.startswith("/api/models/"))
    second_busy = busy[0]
    server.stop()

    out = {
        "models_on_server": args.authors * args.per_author,
        "authors_on_server": args.authors,
        "watched_authors": args.watched,
        "server_setup_seconds": round(setup_s, 2),
        "poll_ok": res.ok,
        "poll_seconds": round(first_s, 3),
        "server_handler_seconds": round(first_busy, 3),
        "hub_requests": first_requests,
        "listing_requests": first_requests - first_info,
        "model_info_requests": first_info,
        "decisions": res.decided,
        "queued": len(res.queued),
        "decisions_per_second": round(res.decided / first_s, 1) if first_s else None,
        "db_bytes": store.db_size(),
        "second_poll_seconds": round(second_s, 3),
        "second_poll_server_handler_seconds": round(second_busy, 3),
        "second_poll_hub_requests": second_requests,
        "second_poll_model_info_requests": second_info,
        "second_poll_decisions": res2.decided,
        "target_seconds": 10,
        "meets_target": first_s < 10 and second_info == 0,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
