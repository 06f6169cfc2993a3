"""``ggufbot toolchain install|info|list|use``: llama.cpp builds from the pinned source, a git repository or a local
checkout (converters/llama/builds.py), and the one in use.

``bot/commands/core.py`` registers ``toolchain install|info`` for the pinned build; this module (discovered after it)
extends those parsers with ``--source git --url U --ref R`` / ``--source dir --path P`` and adds ``list`` and ``use``.
Without ``--source``, ``install`` builds what the settings' ``[toolchain]`` section names (``--config`` or
``$GGUFBOT_CONFIG``), the pinned build by default, exactly as before; a build named by the settings becomes the one
in use only while the pinned one is (a release the bot followed to stays in use across restarts).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bot.commands import stderr
from converters.core.errors import ConfigError, ToolchainError, ToolError
from converters.llama import builds, native
from converters.llama import toolchain
from converters.llama.sources import KINDS, Source


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("toolchain", help="install, list and choose llama.cpp builds")
    t.description = "llama.cpp builds: the pinned one, git commits and local trees; the one in use"
    actions = t.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    ti = actions.add_parser("install", help="fetch and build llama.cpp (cached; a no-op when built)")
    ti.add_argument("--jobs", type=int, default=None, help="build jobs (default: all cores)")
    ti.add_argument("--source", choices=KINDS, default=None,
                    help="pinned (default), git (--url, --ref) or dir (--path); default: the settings' [toolchain]")
    ti.add_argument("--url", help="git: the llama.cpp repository (file:///..., https://...)")
    ti.add_argument("--ref", help="git: a release tag (b6500), a branch or a commit")
    ti.add_argument("--path", type=Path, help="dir: a local llama.cpp checkout")
    ti.add_argument("--config", type=Path, default=None, help="settings file whose [toolchain] section to install")
    ti.add_argument("--no-use", action="store_true", help="build it, but keep the build in use")
    ti.set_defaults(func=cmd_install)
    tf = actions.add_parser("info", help="print the build in use as JSON")
    tf.set_defaults(func=cmd_info)
    tl = actions.add_parser("list", help="the builds in the cache and which one is in use")
    tl.add_argument("--json", action="store_true", help="print them as JSON")
    tl.set_defaults(func=cmd_list)
    tu = actions.add_parser("use", help="make a build the one in use: a build name, a release tag, a commit or pinned")
    tu.add_argument("build", help="build name, tag (b6500), commit (7+ hex) or 'pinned'")
    tu.set_defaults(func=cmd_use)


def _source(args: argparse.Namespace) -> Source:
    if args.source is None and (args.url or args.ref or args.path):
        raise ConfigError("--url, --ref and --path need --source git or --source dir")
    if args.source is not None:
        return Source(args.source, url=args.url, ref=args.ref, path=args.path)
    if args.config is None and not os.environ.get("GGUFBOT_CONFIG"):
        return Source("pinned")
    from bot.model import settings as settings_mod

    return settings_mod.load(args.config).toolchain.as_source()


def cmd_install(args: argparse.Namespace) -> int:
    source = _source(args)
    last = [0.0]

    def on_line(line: str) -> None:
        now = time.monotonic()
        if line.startswith("[") and now - last[0] > 5:
            last[0] = now
            stderr(line[:160])

    if source.kind != "pinned":
        stderr(f"installing llama.cpp from {source.kind} {source.url or source.path or ''} {source.ref or ''}".rstrip())
    elif toolchain.find(required=False) is None:
        stderr("building llama.cpp: this takes several minutes (about 6 on 2 cores)")
    b = builds.install(source, jobs=args.jobs, on_line=on_line)
    how = f"programs of {b.reused_from}" if b.reused_from else "compiled"
    print(f"{b.version} ready ({'CUDA' if b.cuda else 'CPU'}, {how}) as {b.name} in {b.path}")
    tc = toolchain.find(required=False)
    if tc is not None:  # the tuner's measuring and assembling programs, compiled against that tree's ggml (cached)
        try:
            print(f"{native.TENSORERR} and {native.ASSEMBLE} ready in {native.programs(tc)}")
        except (ToolchainError, ToolError) as e:
            stderr(f"{native.TENSORERR} and {native.ASSEMBLE} not built ({e}): tuning will measure whole tensors and "
                   "build its files with llama-quantize")
    # asked for on the command line: it is the one in use now; from the settings: only when the pinned build was (a
    # release the bot followed to since then stays in use when the service restarts and installs its settings again)
    explicit = args.source is not None
    if not args.no_use and (explicit or builds.active() is None) and (in_use := builds.in_use()) != b:
        builds.use(b)
        print(f"in use: {b.name}" + (f" (was {in_use.name})" if in_use else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    tc = toolchain.find(required=True)
    assert tc is not None
    info = tc.describe()
    b = builds.in_use()
    if b is not None:
        info.update({"build": b.name, "source": b.source, "native_digest": b.native_digest,
                     "reused_from": b.reused_from})
    print(json.dumps(info, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    used = builds.in_use()
    rows = [{**b.describe(), "in_use": used is not None and b.name == used.name} for b in builds.builds()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no llama.cpp build yet: run 'ggufbot toolchain install'")
        return 0
    for r in rows:
        mark = "*" if r["in_use"] else " "
        reuse = f"  programs of {r['reused_from']}" if r["reused_from"] else ""
        print(f"{mark} {r['name']:<40} {r['source']:<6} {r['tag'] or '-':<8} {(r['commit'] or '-')[:12]:<12} "
              f"{r['version']}{reuse}")
    return 0


def cmd_use(args: argparse.Namespace) -> int:
    b = builds.use(args.build)
    print(f"in use: {b.name} ({b.version}); jobs already running finish on the build they started with")
    return 0
