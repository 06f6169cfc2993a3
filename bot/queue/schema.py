"""The queue's schema: what the installed procrastinate brings (its version, its full schema, its migration files),
handed to the state store that opens a PostgreSQL database (:class:`bot.state.schema.QueueSchema`: migration 3
creates it, ``ggufbot migrate`` upgrades it), and the check that a box's workers run on the schema they expect.

procrastinate keeps no record of what a database has: ``queue_migrations`` is ggufbot's (``bot.state.schema``).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from procrastinate.schema import SchemaManager

from bot.state.schema import QueueSchema
from bot.state.store import Store
from converters.core.errors import StateError

# Every procrastinate schema ggufbot made before queue_migrations existed came from procrastinate >= 3.10 (the pin
# since ggufbot first used it): such a database has every migration up to this version.
BASELINE = (3, 10, 0)


def _installed() -> QueueSchema:
    """The installed procrastinate: each migration a ``MM.mm.pp_NN_name.sql`` in ``procrastinate/sql/migrations``,
    applied in name order; ``schema.sql`` is the result of all of them."""
    folder = Path(SchemaManager.get_migrations_path())
    return QueueSchema(version=importlib.metadata.version("procrastinate"), schema=SchemaManager.get_schema,
                       migrations=tuple(sorted(p.name for p in folder.glob("*.sql"))),
                       read=lambda name: (folder / name).read_text(encoding="utf-8"), baseline=BASELINE)


INSTALLED = _installed()


def open_store(url: str, *, migrate: bool = True) -> Store:
    """The state store of a PostgreSQL ``url``, with the installed procrastinate's schema to create."""
    return Store(url, migrate=migrate, queue_schema=INSTALLED)


def check_schema(store: Store) -> None:
    """Refuse to run procrastinate workers on a schema that is not the installed procrastinate's."""
    pending, unknown = store.queue_state()
    version = store.queue_schema.version if store.queue_schema else INSTALLED.version
    if pending:
        raise StateError(f"the queue schema in PostgreSQL is older than procrastinate {version} on this "
                         f"box: {len(pending)} migration(s) not applied ({', '.join(pending)}); run `ggufbot "
                         "migrate` (with the other boxes' workers stopped or upgraded)")
    if unknown:
        raise StateError(f"the queue schema in PostgreSQL has migrations procrastinate {version} on this "
                         f"box does not know ({', '.join(unknown)}): a newer procrastinate migrated it; upgrade "
                         "this box")
