"""The test Hub server's uplink (``upload_bytes_per_second``): LFS uploads through the real client are read no faster
than the link, concurrent uploads share it, and each upload's span is kept (the pipeline benchmark's network)."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

from tests.hub_fixtures import TEST_ORG
from tests.hubserver import HubServer


def test_lfs_uploads_share_one_throttled_link(hub_server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    repo = f"{TEST_ORG}/uplink"
    api.create_repo(repo)
    files = []
    for i in range(2):
        f = tmp_path / f"f{i}.gguf"
        f.write_bytes(os.urandom(300_000))
        files.append(f)
    hub_server.upload_bytes_per_second = 1_000_000
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two pre-uploads at once: 600 kB over a 1 MB/s link
        list(pool.map(lambda f: api.preupload_lfs_files(repo, [CommitOperationAdd(f.name, f)]), files))
    wall = time.monotonic() - t0
    assert wall >= 0.55
    spans = hub_server.upload_spans
    assert sorted(b for _, _, b in spans) == [300_000, 300_000]
    assert max(e for _, e, _ in spans) - min(s for s, _, _ in spans) >= 0.55
    hub_server.upload_bytes_per_second = None
    f = tmp_path / "fast.gguf"
    f.write_bytes(os.urandom(300_000))
    t0 = time.monotonic()
    api.preupload_lfs_files(repo, [CommitOperationAdd(f.name, f)])
    assert time.monotonic() - t0 < 0.5
