"""``ggufbot publish DIR [--repo ORG/NAME] [--private] [--dry-run]``: publish one work directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from converters.core.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish a finished work directory to the Hub (one atomic commit)",
                       description="Upload the quants that passed the gate, the imatrix files, report.json, the "
                       "chart and a generated model card in one commit. Publishing the same again makes no "
                       "commit. The token comes from HF_TOKEN (or the settings file given with --config).")
    p.add_argument("workdir", type=Path, metavar="DIR", help="work directory with ladder.json and report.json")
    p.add_argument("--repo", help="target repo ORG/NAME (default: from --repo-template)")
    p.add_argument("--repo-template", default=None,
                   help="target repo name template with {org} and {model} (default: {org}/{model}-GGUF)")
    p.add_argument("--namespace", help="{org} of the template (default: the token's user)")
    p.add_argument("--quantized-by", help="the card's quantized_by (default: the namespace)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--adopt", action="store_true",
                   help="with --repo: write to that repo even without the ggufbot tag in its card (made by hand or "
                        "another tool); a repo of another source is still refused")
    p.add_argument("--config", type=Path, help="settings file (token file, endpoint, target namespace/template)")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and upload nothing")
    p.add_argument("--early", action="store_true",
                   help="publish in groups along [publish] order and groups (default: Q4_K_M first, then Q8_0, Q6_K, "
                        "Q5_K_M, then the rest): each group is committed as soon as its files are uploaded, the card "
                        "naming the files still coming; a killed run resumes without uploading again")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from bot.hub.client import Hub
    from bot.publish.commit import DEFAULT_REPO_TEMPLATE, PublishOptions, publish

    from bot.publish.target import TargetPolicy

    from bot.publish.early import EarlyOptions, EarlyPublisher

    token = endpoint = None
    namespace, template, private = args.namespace, args.repo_template, args.private
    early = EarlyOptions()
    policy = TargetPolicy()
    if args.config is not None:
        from bot.model import settings as settings_mod

        s = settings_mod.load(args.config)
        token, endpoint = s.token, s.hub.endpoint
        namespace = namespace or s.target.namespace
        template = template or s.target.repo_template
        private = private or s.target.private
        policy = TargetPolicy(on_collision=s.target.on_collision, adopt=tuple(s.target.adopt))
        early = EarlyOptions(order=s.publish.order, groups=s.publish.groups)
    if args.early and args.dry_run:
        raise InputError("--early uploads as it goes: it has no dry run")
    if args.adopt:
        if not args.repo:
            raise InputError("--adopt needs --repo: name the repo to adopt")
        policy = TargetPolicy(on_collision=policy.on_collision, adopt=(*policy.adopt, args.repo))
    options = PublishOptions(repo_id=args.repo, repo_template=template or DEFAULT_REPO_TEMPLATE,
                             namespace=namespace, private=private, quantized_by=args.quantized_by, policy=policy)
    from bot.commands import TtyHooks, cli_hooks
    from converters.core.hooks import END, START, Event

    hub = Hub(token=token, endpoint=endpoint)
    with cli_hooks() as hooks:  # a spinner and the time taken on a terminal; nothing more otherwise
        tty = isinstance(hooks, TtyHooks)
        if tty:
            hooks.progress(Event("publish", START))
        if args.early:
            plan, result = None, EarlyPublisher(args.workdir, hub, options, early).finish()
        else:
            plan, result = publish(args.workdir, hub, options, dry_run=args.dry_run)
        if tty:
            hooks.progress(Event("publish", END))
    if result is None:
        assert plan is not None
        print(json.dumps(plan.describe(), indent=2))
        return 0
    if result.action == "none":
        print(f"{result.repo_id} is up to date: nothing to publish ({result.url})")
    else:
        print(f"{result.action}d {result.repo_id}: commit {result.commit} ({result.url})")
    return 0
