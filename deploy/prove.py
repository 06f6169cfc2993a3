"""Proof that the cpu image works, built and run on this machine (not part of ``make test``: it builds llama.cpp
inside the image, tens of minutes on 2 cores).

    .venv/bin/python deploy/prove.py [--docker /usr/bin/docker] [--keep-image]
    .venv/bin/python deploy/prove.py --local     # steps 5-7 with this checkout's venv, no docker (checks the script)

Steps (each printed with its time):
1. dockerd: used when running, else installed (Debian's ``docker.io``) and started, and stopped at the end;
2. a base image without any registry: ``debootstrap`` of Debian bookworm (python3.11, the Python the wheelhouse
   is downloaded for) imported with ``docker import``;
3. a wheelhouse (torch, ggufbot's dependencies, the llama-cpp-python sdist) downloaded with this machine's pip and
   served on loopback: the image build installs from it alone (``PIP_NO_INDEX=1``, ``PIP_FIND_LINKS``);
4. ``docker build --target cpu`` with host networking;
5. the local Hub server (tests/hubserver.py) with SmolLM2 (tests/models.py; a random model would not pass the
   quality gate) as a new release; the container (``--network host``,
   the token from a mounted secret file) takes the job; ``/healthz`` answers;
6. ``docker stop`` as soon as the job is in its quantize stage: the bot finishes the running step and exits 0
   with the job back in the queue; some of the ladder is done, not all;
7. ``docker start``: the job resumes and its ladder is published; every stage finished before the stop is
   skipped after the restart (its ``stage.skip`` event), none is done again.
It exits non-zero at the first check that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from converters.llama import toolchain

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the tests' texts (tests/conftest.py)
BASE_TAG = "ggufbot-proof-base:bookworm"
IMAGE_TAG = "ggufbot:proof"
CONTAINER = "ggufbot-proof"
TOKEN = "hf_proof_local_token_0123456789"  # accepted by the local test server only
USER, ORG = "prover", "proof-org"
SOURCE = "proof-labs/SmolLM2-135M-Instruct"
LADDER = "Q8_0,Q6_K,Q4_K_M"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", flush=True)


def fail(msg: str) -> None:
    say(f"FAILED: {msg}")
    raise SystemExit(1)


def sh(*argv: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), text=True, capture_output=capture, **kw)
    if check and r.returncode != 0:
        fail(f"{' '.join(argv[:4])} ... exited {r.returncode}: {(r.stderr or '')[-2000:]}")
    return r


class Docker:
    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.daemon: subprocess.Popen | None = None

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return sh(self.exe, *args, **kw)

    def up(self) -> bool:
        return self("info", check=False).returncode == 0

    def ensure_daemon(self, workdir: Path) -> None:
        if self.up():
            say("dockerd: already running")
            return
        if shutil.which("dockerd") is None or shutil.which("debootstrap") is None:
            say("installing docker.io and debootstrap (apt-get)")
            sh("apt-get", "update", "-q")
            sh("apt-get", "install", "-y", "-q", "docker.io", "debootstrap",
               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        log = open(workdir / "dockerd.log", "w")  # noqa: SIM115 (closed with the daemon)
        self.daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(120):
            if self.up():
                say(f"dockerd: started (pid {self.daemon.pid})")
                return
            if self.daemon.poll() is not None:
                fail(f"dockerd exited {self.daemon.returncode}; see {workdir / 'dockerd.log'}")
            time.sleep(0.5)
        fail("dockerd did not answer in 60 s")

    def stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait(10)
        say("dockerd: stopped")

    def buildkit_env(self) -> dict[str, str]:
        """BuildKit when this client can drive it (buildx, or a client older than 23 with its own); else the
        classic builder, which builds the cpu stages only as well (they come first in the Dockerfile)."""
        env = dict(os.environ)
        buildx = self("buildx", "version", check=False).returncode == 0
        client = self("version", "--format", "{{.Client.Version}}", check=False).stdout.strip()
        old = bool(re.match(r"^(1\d|2[0-2])\.", client))
        env["DOCKER_BUILDKIT"] = "1" if (buildx or old) else "0"
        return env


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 .sources or sources.list)."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", f.read_text(), re.M)
        if m:
            return m.group(1)
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if f.exists():
            m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", f.read_text(), re.M)
            if m:
                return m.group(1)
    fail("no Debian mirror found in the apt sources")
    raise AssertionError


def ensure_base(docker: Docker, workdir: Path) -> None:
    if docker("image", "inspect", BASE_TAG, check=False).returncode == 0:
        say(f"base image {BASE_TAG}: present")
        return
    rootfs = workdir / "rootfs"
    started = time.monotonic()
    sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
       str(rootfs), apt_mirror())
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    docker("import", "-", BASE_TAG, stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    say(f"base image {BASE_TAG}: debootstrap + docker import in {time.monotonic() - started:.0f} s")


def wheelhouse() -> Path:
    """torch, ggufbot's dependencies, the build backends and the pinned llama.cpp sdist, for Python 3.11."""
    wh = toolchain.cache_root() / "proof-wheelhouse"  # kept: pip downloads only what is not there yet
    wh.mkdir(parents=True, exist_ok=True)
    if sys.version_info[:2] != (3, 11):
        fail("run this with Python 3.11 (the base image's Python): the wheelhouse is downloaded for it")
    started = time.monotonic()
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(wh)]
    sh(*pip, "torch==2.13.0", f"{REPO_ROOT}[postgres]", "setuptools>=68", "wheel", "scikit-build-core[pyproject]>=0.9.2")
    sh(*pip, "--no-deps", "--no-binary", toolchain.PINNED_PACKAGE, f"{toolchain.PINNED_PACKAGE}=={toolchain.PINNED_VERSION}")
    say(f"wheelhouse: {len(list(wh.iterdir()))} files in {time.monotonic() - started:.0f} s")
    return wh


# A fixed port: the URL is a build argument, and a changed build argument would miss docker's layer cache
WHEELHOUSE_PORT = 18765


@contextlib.contextmanager
def serve_dir(path: Path):
    """``path`` over HTTP on loopback (pip's --find-links); yields the URL."""
    handler = functools.partial(QuietHandler, directory=str(path))
    server = ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def build_image(docker: Docker, links: str, workdir: Path) -> float:
    started = time.monotonic()
    log = workdir / "build.log"
    with open(log, "w") as f:
        r = subprocess.run([docker.exe, "build", "--network", "host", "-f", "deploy/Dockerfile", "--target", "cpu",
                            "-t", IMAGE_TAG, "--build-arg", f"BASE_IMAGE={BASE_TAG}", "--build-arg", "PIP_NO_INDEX=1",
                            "--build-arg", f"PIP_FIND_LINKS={links}", "."], cwd=REPO_ROOT, stdout=f,
                           stderr=subprocess.STDOUT, env=docker.buildkit_env())
    if r.returncode != 0:
        fail(f"docker build exited {r.returncode}; the end of {log}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - started


def texts(workdir: Path) -> Path:
    """A calibration and an evaluation text (the tests' shared ones, cut to what 2 chunks of 256 tokens need)."""
    d = workdir / "texts"
    d.mkdir()
    for name, out in (("groups_merged.txt", "calibration.txt"), ("wiki.test.raw", "evaluation.txt")):
        src = SHARED_DATA / name
        if not src.exists():
            fail(f"shared test data not found: {src}")
        (d / out).write_bytes(src.read_bytes()[:200_000])
    return d


def config(path: Path, web_port: int, data: str = "/data", texts: str = "/texts") -> None:
    path.write_text(f"""
data_dir = "{data}"

[[sources]]
author = "{SOURCE.split('/')[0]}"
lookback_days = 2

[limits]
max_model_gb = 2.0
min_free_disk_gb = 0.5

[quantize]
ladder = "{LADDER}"
calibration_text = "{texts}/calibration.txt"
evaluation_text = "{texts}/evaluation.txt"
calibration_chunks = 2
evaluation_chunks = 2
ctx = 256

[schedule]
poll_minutes = 60
dispatch_seconds = 0.5
heartbeat_seconds = 1
retry_base_seconds = 1

[web]
listen = "127.0.0.1:{web_port}"
""")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class State:
    """The bot's SQLite database in the mounted data directory, read from the host."""

    def __init__(self, data: Path) -> None:
        self.path = data / "ggufbot.db"

    def query(self, sql: str, *args) -> list[tuple]:
        if not self.path.exists():
            return []
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not made yet, or busy
            return []

    def job(self) -> tuple | None:
        rows = self.query("select id, status, stage, attempts from jobs where repo = ? order by id", SOURCE)
        return rows[-1] if rows else None

    def stage_events(self, job_id: int, since: float = 0.0) -> list[tuple[str, str]]:
        return [(k, m) for k, m in self.query("select kind, message from events where job_id = ? and at >= ? and "
                                              "kind in ('stage.end', 'stage.skip') order by id", job_id, since)]


def label(message: str) -> str:
    """The stage a stage.end/stage.skip event names: "fetch done: 6 files, ..." -> "fetch"."""
    m = re.match(r"^(.*?) (?:done|skipped)\b", message)
    return m.group(1) if m else message


class ContainerBot:
    """The bot as the container ``name`` (created beforehand)."""

    def __init__(self, docker: Docker, name: str) -> None:
        self.docker, self.name = docker, name

    def start(self) -> None:
        self.docker("start", self.name)

    def running(self) -> bool:
        return self.docker("inspect", "-f", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def stop(self) -> int:
        """``docker stop``: SIGTERM, SIGKILL only after 900 s; the exit code."""
        self.docker("stop", "-t", "900", self.name)
        return int(self.docker("inspect", "-f", "{{.State.ExitCode}}", self.name).stdout.strip())

    def logs(self, since: float | None = None) -> str:
        r = self.docker("logs", *(["--since", f"{since:.3f}"] if since else []), self.name, check=False)
        return r.stderr + r.stdout  # the bot logs to stderr

    def remove(self) -> None:
        self.docker("rm", "-f", self.name, check=False)


class LocalBot:
    """The same bot run from this checkout's venv (--local: checks this script and the bot without docker)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen | None = None
        self.marks: list[tuple[float, int]] = []  # (time, log size) at each start

    def start(self) -> None:
        self.marks.append((time.time(), self.log.stat().st_size if self.log.exists() else 0))
        out = open(self.log, "a")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(900)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(30)

    def logs(self, since: float | None = None) -> str:
        text = self.log.read_text() if self.log.exists() else ""
        offset = max((size for at, size in self.marks if since is not None and at <= since + 1e-3), default=0)
        return text[offset:]

    def remove(self) -> None:
        if self.running():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def wait_for(what: str, cond, timeout: float, bot, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        if not bot.running():
            fail(f"the bot stopped while waiting for {what}:\n" + bot.logs()[-6000:])
        time.sleep(step)
    fail(f"no {what} after {timeout:.0f} s:\n" + bot.logs()[-6000:])


def save_logs(bot, path: Path, since: float | None = None) -> str:
    text = bot.logs(since)
    path.write_text(text)
    return text


QUANT_DONE = re.compile(r"quantize (\S+): done in")
QUANT_SKIPPED = re.compile(r"quantize (\S+): already done, skipped")


def healthz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docker", default=shutil.which("docker") or "docker", help="the docker client to use")
    ap.add_argument("--keep-image", action="store_true", help="keep the built image (default: removed)")
    ap.add_argument("--local", action="store_true",
                    help="no docker: the same start/stop/resume proof with this checkout's venv (checks the script)")
    args = ap.parse_args()
    os.chdir(REPO_ROOT)
    docker = Docker(args.docker)
    workdir = Path(tempfile.mkdtemp(prefix="ggufbot-prove-"))
    hub = bot = None
    ok = False
    build_s, size = 0.0, 0
    try:
        if not args.local:
            docker.ensure_daemon(workdir)
            ensure_base(docker, workdir)
            wh = wheelhouse()
            with serve_dir(wh) as links:
                say(f"building the cpu target (wheels from a loopback server; log {workdir / 'build.log'})")
                build_s = build_image(docker, links, workdir)
            size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE_TAG).stdout.strip())
            say(f"image {IMAGE_TAG}: built in {build_s:.0f} s, size {size / 1e9:.2f} GB")
            doctor = docker("run", "--rm", IMAGE_TAG, "doctor", check=False)
            say(f"ggufbot doctor in the image (exit {doctor.returncode}):\n" + doctor.stdout)

        # ---- the local Hub with one new release
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        from tests.bot_fixtures import checkpoint_files
        from tests.hubserver import HubServer
        from tests.models import smollm2_checkpoint

        model = smollm2_checkpoint()
        params = sum(f.stat().st_size for f in model.glob("*.safetensors")) // 2  # bf16
        hub = HubServer(valid_tokens={TOKEN: USER}, user_orgs={USER: [ORG]})
        hub.start()
        hub.add_model(SOURCE, checkpoint_files(model), card_data={"license": "apache-2.0"},
                      pipeline_tag="text-generation", library_name="transformers",
                      config=json.loads((model / "config.json").read_text()), safetensors_params=params)
        data, cache = workdir / "data", workdir / "cache"
        for d in (data, cache):
            d.mkdir()
            os.chown(d, 10001, 10001)  # the image's ggufbot user
        secret = workdir / "hf_token"
        secret.write_text(TOKEN + "\n")
        secret.chmod(0o644)  # readable by the container's user; a real box uses a compose/systemd secret
        web_port = free_port()
        cfg = workdir / "ggufbot.toml"
        tx = texts(workdir)
        if args.local:
            config(cfg, web_port, data=str(data), texts=str(tx))
            env = {**os.environ, "GGUFBOT_CONFIG": str(cfg), "GGUFBOT_HUB__TOKEN_FILE": str(secret),
                   "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(cache / "huggingface")}
            env.pop("HF_TOKEN", None)
            bot = LocalBot([str(Path(sys.executable).with_name("ggufbot")), "run"], env, workdir / "bot.log")
        else:
            config(cfg, web_port)
            docker("rm", "-f", CONTAINER, check=False)
            docker("create", "--name", CONTAINER, "--network", "host",
                   "-v", f"{data}:/data", "-v", f"{cache}:/cache", "-v", f"{tx}:/texts:ro",
                   "-v", f"{cfg}:/etc/ggufbot/ggufbot.toml:ro", "-v", f"{secret}:/run/secrets/hf_token:ro",
                   "-e", "GGUFBOT_CONFIG=/etc/ggufbot/ggufbot.toml",
                   "-e", "GGUFBOT_HUB__TOKEN_FILE=/run/secrets/hf_token",
                   "-e", f"HF_ENDPOINT={hub.url}", "-e", "HF_HUB_DISABLE_XET=1", IMAGE_TAG, "run")
            if TOKEN in docker("inspect", "-f", "{{json .Config.Env}}", CONTAINER).stdout:
                fail("the token is visible in docker inspect")
            bot = ContainerBot(docker, CONTAINER)
        state = State(data)
        ladder = set(LADDER.split(","))

        # ---- first start: the job runs until its quantize stage, then the stop (SIGTERM)
        t_start = time.monotonic()
        bot.start()
        code = wait_for("/healthz", lambda: healthz(web_port), 300, bot, step=0.5)
        say(f"started; /healthz answered {code} after {time.monotonic() - t_start:.1f} s")
        job = wait_for("the job in its quantize stage", lambda: (j := state.job()) and j[2] == "quantize" and j,
                       3600, bot)
        say(f"job {job[0]} is quantizing ({time.monotonic() - t_start:.0f} s after the start): stop (SIGTERM)")
        t_stop = time.monotonic()
        exit_code = bot.stop()
        stop_s = time.monotonic() - t_stop
        log1 = save_logs(bot, workdir / "run1.log")
        job = state.job()
        say(f"stopped in {stop_s:.1f} s, exit code {exit_code}; job {job[0]}: {job[1]}, stage {job[2]}, "
            f"attempts {job[3]}")
        if exit_code != 0:
            fail("the bot did not stop cleanly on SIGTERM")
        if job[1] != "queued":
            fail(f"the job is {job[1]}, not back in the queue")
        done_before = {label(m) for k, m in state.stage_events(job[0]) if k == "stage.end"}
        quants_before = set(QUANT_DONE.findall(log1))
        say(f"finished before the stop: stages {', '.join(sorted(done_before))}; quant types "
            f"{', '.join(sorted(quants_before)) or 'none'} of {LADDER}")
        if "quantize" in done_before or quants_before >= ladder:
            fail("the whole ladder was quantized before the stop took effect: not a stop during quantization")
        target = state.query("select target_repo from jobs where id = ?", job[0])[0][0]
        if target and hub.head(target) and any(f.endswith(".gguf") for f in hub.files(target)):
            fail(f"{target} got GGUF files before the stop")

        # ---- second start: the job resumes and publishes; nothing finished before is done again
        restart_at = time.time()
        t_restart = time.monotonic()
        bot.start()
        job = wait_for("the published job", lambda: (j := state.job()) and j[1] in ("published", "failed") and j,
                       3600, bot, step=0.5)
        resume_s = time.monotonic() - t_restart
        log2 = save_logs(bot, workdir / "run2.log", since=restart_at)
        if job[1] != "published":
            err = state.query("select error_type, error_message from jobs where id = ?", job[0])
            fail(f"the job failed after the restart: {err}")
        after = state.stage_events(job[0], since=restart_at)
        ended = {label(m) for k, m in after if k == "stage.end"}
        skipped = {label(m) for k, m in after if k == "stage.skip"}
        quants_skipped, quants_after = set(QUANT_SKIPPED.findall(log2)), set(QUANT_DONE.findall(log2))
        repo = state.query("select target_repo from jobs where id = ?", job[0])[0][0]
        files = sorted(hub.files(repo))
        ggufs = [f for f in files if f.endswith(".gguf")]
        say(f"resumed and published {repo} in {resume_s:.0f} s: {len(ggufs)} GGUF files, {len(files)} files")
        say(f"after the restart: stages skipped {', '.join(sorted(skipped))}; done {', '.join(sorted(ended))}")
        say(f"after the restart: quant types skipped {', '.join(sorted(quants_skipped)) or 'none'}; done "
            f"{', '.join(sorted(quants_after))}")
        redone = sorted(done_before & ended) + sorted(f"quantize {q}" for q in quants_before & quants_after)
        if redone:
            fail(f"done again after the restart: {redone}")
        if not done_before <= skipped:
            fail(f"finished before the stop but not skipped after: {sorted(done_before - skipped)}")
        if not quants_before <= quants_skipped or quants_before | quants_after != ladder:
            fail("the quant types done before the stop were not all skipped, or some were never done")
        if len(ggufs) < len(ladder):
            fail(f"the published ladder is incomplete: {ggufs}")
        bot.stop()
        built = "" if args.local else f"build {build_s:.0f} s, image {size / 1e9:.2f} GB, "
        say(f"PROOF OK{' (local, no docker)' if args.local else ''}: {built}stop {stop_s:.1f} s, "
            f"resume to publication {resume_s:.0f} s")
        ok = True
        return 0
    finally:
        if bot is not None:
            bot.remove()
        if hub is not None:
            hub.stop()
        if not args.local and not args.keep_image:
            docker("rmi", IMAGE_TAG, check=False)
        docker.stop_daemon()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"kept for a look: {workdir} (build.log, run1.log, run2.log, data/)")


if __name__ == "__main__":
    sys.exit(main())
