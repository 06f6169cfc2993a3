"""Child programs never outlive ggufbot, never see a secret, and stop when asked (``converters.core.proc.run``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from converters.core import proc
from converters.core.errors import Cancelled, ToolError
from tests.procs import gone, kill_quietly, wait_for_child

# A ggufbot process in miniature: the command line's signal handlers, then one program through proc.run.
PARENT = textwrap.dedent("""
    import sys
    from bot import cli
    from converters.core import proc
    cli.install_signal_handlers()
    try:
        proc.run([sys.executable, "-c", "import time; time.sleep(120)"])
    except KeyboardInterrupt as e:
        sys.exit(128 + getattr(e, "signum", 2))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL])
def test_a_signalled_parent_leaves_no_child_running(sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    child = None
    try:
        child = wait_for_child(parent.pid, "python", within=30)
        t0 = time.monotonic()
        parent.send_signal(sig)
        assert parent.wait(timeout=10) == (-sig if sig == signal.SIGKILL else 128 + sig)
        assert gone(child, within=5), f"the child outlived its parent after {sig.name}"
        assert time.monotonic() - t0 < 5
    finally:
        kill_quietly(parent.pid, *([child] if child else []))


def test_children_get_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_a")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret_b")
    monkeypatch.setenv("OPENAI_API_KEY", "sk_c")
    monkeypatch.setenv("github_token", "gh_d")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # allow-listed (proc.CHILD_ENV); nothing else of ours is passed
    res = proc.run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                        env={"EXTRA_KEY": "e", "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    env = json.loads(res.stdout)
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "github_token", "EXTRA_KEY"} & set(env)
    assert not any(v.startswith(("hf_secret", "sk_c", "gh_d")) for v in env.values())
    assert env["OMP_NUM_THREADS"] == "2"


def test_resource_limits_apply_to_the_child():
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_CPU)[0], resource.getrlimit(resource.RLIMIT_AS)[0])"
    res = proc.run([sys.executable, "-c", code],
                        limits=proc.ResourceLimits(cpu_seconds=7, memory_bytes=1 << 30))
    assert res.stdout.split() == ["7", str(1 << 30)]


def test_a_stop_request_kills_the_program_group_within_a_second(tmp_path):
    marker = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise Cancelled("stop requested")

    threading.Timer(1.5, stop.set).start()
    t0 = time.monotonic()
    with proc.watched(proc.Watch(check=check)), pytest.raises(Cancelled):
        proc.run([sys.executable, "-c", code])
    assert time.monotonic() - t0 < 1.5 + 1.0
    assert gone(int(marker.read_text()), within=2)  # the whole group, not just the program


def test_the_watch_caps_the_run_time_and_sees_output():
    seen = []
    with proc.watched(proc.Watch(timeout=1.0, alive=lambda: seen.append(1))):
        with pytest.raises(ToolError) as ei:
            proc.run([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(30)"], timeout=60)
    assert ei.value.timed_out and ei.value.transient and seen
