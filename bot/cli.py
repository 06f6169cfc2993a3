"""The ``ggufbot`` command line. Subcommands live in the modules of ``bot.commands``: each defines
``register(subparsers)`` and sets ``func`` on its parsers; this module only discovers and dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading

from converters.core import proc
from converters.core.errors import GgufbotError

log = logging.getLogger("ggufbot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggufbot", description="GGUF quant ladders from Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import bot.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"bot.commands.{info.name}")
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    env = os.environ.get("GGUFBOT_LOG_LEVEL")
    if env:
        level = getattr(logging, env.upper(), level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


class SignalExit(KeyboardInterrupt):
    """SIGTERM, SIGINT or SIGHUP: unwinds the command like Ctrl-C (no ``except Exception`` stops it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def on_signal(signum: int, _frame: object) -> None:
    """Kill every running child program's process group at once, refuse new ones, then unwind."""
    proc.kill_all(closing=True)
    raise SignalExit(signum)


def install_signal_handlers() -> dict[int, object]:
    """Install :func:`on_signal` (main thread only); returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}


def main(argv: list[str] | None = None) -> int:
    """The ``ggufbot`` command. Called without ``argv`` it is the process itself (the console script, ``python -m
    bot.cli``): it becomes its children's subreaper (an orphaned descendant comes back to it, not to PID 1) and, on
    every way out (return, error, signal), kills what is left of its children. A caller passing ``argv`` (a test)
    keeps its own children."""
    own_process = argv is None
    if own_process:
        proc.own_children()
    try:
        return _main(argv)
    finally:
        if own_process:
            proc.kill_children()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the service logs one line per stage by default; one-shot commands stay quiet unless -v
    setup_logging(args.verbose + (1 if args.command == "run" else 0))
    previous = install_signal_handlers()  # ``run`` replaces them with the bot's (stop, release the jobs, exit)
    try:
        return int(args.func(args) or 0)
    except GgufbotError as e:
        print(f"error: {e.short()}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return 1
    except KeyboardInterrupt as e:
        name = signal.Signals(e.signum).name if isinstance(e, SignalExit) else "SIGINT"
        print(f"interrupted ({name}); child programs were stopped", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, SignalExit) else signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
