"""``ggufbot status`` and the web page show the pipeline: each file of a running job's ladder being made, measured,
uploaded, published (bot/service/status.pipeline_files), from its work directory and progress line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bot.model import settings as settings_mod
from bot.publish.early import RECORD
from bot.service import status
from bot.state.memstore import MemoryStore
from bot.web.site import StatusSite
from converters.core.report import FAILED
from converters.core.workdir import WorkDir
from tests.workdirs import make_workdir


def _running_job(tmp_path: Path) -> tuple[MemoryStore, int, Path]:
    wd = make_workdir(tmp_path, types=("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"))
    w = WorkDir(wd)
    # the plan has seven types; the ladder so far five made; the report three measured, one of them failed, and one
    # measured but held (its verdict waits for its neighbours on the ladder's curve)
    (wd / "plan.json").write_text(json.dumps({"files": [{"type": t} for t in (
        "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_M")]}))
    report = w.report()
    report.files = [f for f in report.files if f.type in ("Q4_K_M", "Q8_0", "Q2_K")]
    report.held = [{"type": "Q3_K_M", "kld_mean": 0.1, "kld_mean_err": 0.01, "chunks": 8}]
    next(f for f in report.files if f.type == "Q2_K").status = FAILED
    w.write_report(report)
    (w.records_path / RECORD).write_text(json.dumps({"repo_id": "o/M-GGUF", "files": {
        "Q4_K_M": {"state": "published", "commit": "c" * 40}, "Q8_0": {"state": "uploading"}}}))
    st = MemoryStore()
    now = time.time()
    job_id = st.enqueue("acme/M", "a" * 40, reason="new release", now=now)
    assert st.claim("w1", now=now).id == job_id
    st.update_running(job_id, "w1", now=now, stage="ladder", workdir=str(wd),
                      progress="making Q5_K_M, measuring Q6_K 7/14")
    return st, job_id, wd


EXPECTED = [{"type": "Q8_0", "state": "uploading"}, {"type": "Q6_K", "state": "measuring"},
            {"type": "Q5_K_M", "state": "making"}, {"type": "Q4_K_M", "state": "published"},
            {"type": "Q3_K_M", "state": "measured"}, {"type": "Q2_K", "state": "failed"},
            {"type": "IQ2_M", "state": "waiting"}]


def test_status_shows_each_file_of_a_running_job(tmp_path: Path) -> None:
    st, job_id, _wd = _running_job(tmp_path)
    s = settings_mod.from_mapping({}, env={}, free_disk=10**12)
    data = status.status_data(st, s, time.time())
    assert data["running"][0]["files"] == EXPECTED
    views = status.running_views(st, time.time())
    assert views[0].files == EXPECTED and views[0].to_json()["files"] == EXPECTED


def test_the_running_page_lists_the_files(tmp_path: Path) -> None:
    st, _job_id, _wd = _running_job(tmp_path)
    site = StatusSite(settings_mod.from_mapping({}, env={}, free_disk=10**12), st)
    html = site.render("running.html.j2", page="running", **site.page_running(None)).body.decode()
    assert '<tr class="file-uploading"><td>Q8_0</td><td>uploading</td></tr>' in html
    assert '<tr class="file-published"><td>Q4_K_M</td><td>published</td></tr>' in html
    assert '<tr class="file-making"><td>Q5_K_M</td><td>making</td></tr>' in html


def test_a_job_without_its_work_dir_here_shows_no_files(tmp_path: Path) -> None:
    st, job_id, wd = _running_job(tmp_path)
    (wd / "plan.json").unlink()
    assert status.pipeline_files(st.job(job_id)) == []
