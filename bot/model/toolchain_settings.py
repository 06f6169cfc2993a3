"""The ``[toolchain]`` settings: where the llama.cpp engine comes from, and whether the bot follows its releases.

```toml
[toolchain]
source = "pinned"          # "pinned" (default: the packaged llama.cpp), "git" (url + ref) or "dir" (path)
url = ""                   # git: the llama.cpp repository (also the one followed)
ref = ""                   # git: a tag (b6500), branch or commit
path = ""                  # dir: a local checkout, built by ggufbot
follow = "off"             # "releases": build each new bNNNN tag in the background, switch after a canary
follow_hours = 6.0         # how often the repository's tags are listed
canary_repo = ""           # a small Hub model converted, quantized and evaluated by every new build
canary_ladder = "Q8_0,Q4_K_M"
canary_chunks = 8          # evaluation chunks of the canary (few: it runs for every new release)
canary_tolerance = 3.0     # a KLD may differ from the build in use by this many combined standard errors
```
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bot.model.repo_names import REPO_ID
from converters.core.errors import ConfigError
from converters.llama.sources import KINDS, Source

FOLLOW = ("off", "releases")


@dataclasses.dataclass(frozen=True)
class ToolchainSettings:
    source: str = "pinned"
    url: str | None = None
    ref: str | None = None
    path: str | None = None
    follow: str = "off"
    follow_hours: float = 6.0
    canary_repo: str | None = None
    canary_ladder: str = "Q8_0,Q4_K_M"
    canary_chunks: int = 8
    canary_tolerance: float = 3.0

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ConfigError(f"toolchain.{key}: {msg}", key=f"toolchain.{key}")

        if self.source not in KINDS:
            bad("source", f"expected one of {', '.join(KINDS)}, got {self.source!r}")
        if self.follow not in FOLLOW:
            bad("follow", f"expected one of {', '.join(FOLLOW)}, got {self.follow!r}")
        if self.follow_hours <= 0:
            bad("follow_hours", "must be positive")
        if self.canary_chunks < 1:
            bad("canary_chunks", "must be at least 1")
        if self.canary_tolerance <= 0:
            bad("canary_tolerance", "must be positive")
        if self.follow == "releases":
            if not self.url:
                bad("url", "follow = \"releases\" needs the llama.cpp repository's URL")
            if not self.canary_repo:
                bad("canary_repo", "follow = \"releases\" needs a small reference model (ORG/NAME) for the canary")
        if self.canary_repo and not REPO_ID.fullmatch(self.canary_repo):
            bad("canary_repo", f"not a repo id ORG/NAME: {self.canary_repo!r}")
        self.as_source()  # source = "git" without url, a bad ref...: the Source's own error

    @property
    def following(self) -> bool:
        return self.follow == "releases"

    def as_source(self) -> Source:
        """The configured source of the engine (``source = "pinned"`` ignores url, ref and path)."""
        if self.source == "git":
            return Source("git", url=self.url, ref=self.ref)
        if self.source == "dir":
            return Source("dir", path=Path(self.path).expanduser() if self.path else None)
        return Source("pinned")

    def release_source(self, tag: str) -> Source:
        """The git source of one release tag of the followed repository."""
        return Source("git", url=self.url, ref=tag)
