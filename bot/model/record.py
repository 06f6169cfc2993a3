"""The project's records of Hub objects: a model (:class:`ModelRecord` with its files, :class:`Sibling`) and a
webhook (:class:`Webhook`). Plain frozen data below every layer: the Hub adapter (:mod:`bot.hub.client`, the one
reader of the client's ``ModelInfo``) builds them, and the rules, the watcher, the jobs and publishing take them
typed, without importing the Hub client."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sibling:
    rfilename: str
    size: int | None
    lfs_sha256: str | None


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    id: str
    sha: str | None
    created_at: dt.datetime | None
    last_modified: dt.datetime | None
    private: bool
    gated: bool | str
    disabled: bool
    tags: tuple[str, ...]
    pipeline_tag: str | None
    library_name: str | None
    license: str | None
    card_data: dict
    config: dict
    siblings: tuple[Sibling, ...]
    safetensors_total: int | None
    downloads: int
    likes: int
    extra: dict

    @property
    def author(self) -> str:
        return self.id.split("/")[0] if "/" in self.id else ""

    def sibling(self, name: str) -> Sibling | None:
        for s in self.siblings:
            if s.rfilename == name:
                return s
        return None


@dataclasses.dataclass(frozen=True)
class Webhook:
    """One of the token's Hub webhooks (never its secret)."""

    id: str
    url: str | None
    watched: tuple[tuple[str, str], ...]  # (type: user/org/model..., name)
    domains: tuple[str, ...]
    disabled: bool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "watched": [{"type": t, "name": n} for t, n in self.watched],
                "domains": list(self.domains), "disabled": self.disabled}
