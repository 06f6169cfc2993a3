"""procrastinate's schema upgrades through ``ggufbot migrate``, on the local PostgreSQL (a throw-away schema each).

A database made by a box running procrastinate 3.3.0 (its own ``schema.sql``, vendored in
``tests/data/procrastinate-3.3.0``; the last schema before the migrations the pinned procrastinate adds) is
refused by a worker, listed by ``ggufbot migrate --check``, upgraded by ``ggufbot migrate`` and then has the
same catalogue as a database made by the installed procrastinate. A database made before ggufbot kept its record
of procrastinate's migrations counts as the pin's floor; one migrated by a newer procrastinate is refused too.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.queue import box as Q
from bot.queue import schema as QS
from bot.model import settings as settings_mod
from bot.cli import main
from bot.state import schema as S
from bot.state.store import Store
from converters.core.errors import StateError
from tests.bot_fixtures import postgres_url

pytestmark = pytest.mark.postgres

OLD = Path(__file__).resolve().parents[1] / "data" / "procrastinate-3.3.0"
NEW_IN_PIN = ["03.04.00_01_pre_add_retry_failed_job_procedure.sql", "03.04.00_50_post_add_retry_failed_job_procedure.sql"]


@pytest.fixture
def pg_url():
    with postgres_url() as url:
        yield url


def made_by_procrastinate_3_3(url: str) -> None:
    """The database as ggufbot on a box with procrastinate 3.3.0 made it: that version's schema.sql, recorded as
    the migrations its package shipped (the installed ones up to 3.3.0: the same files)."""
    old = dataclasses.replace(QS.INSTALLED, version="3.3.0", schema=lambda: (OLD / "schema.sql").read_text(),
                              migrations=tuple(n for n in QS.INSTALLED.migrations
                                               if S.migration_version(n) <= (3, 3, 0)))
    Store(url, queue_schema=old).close()


def catalogue(url: str) -> dict[str, list]:
    """procrastinate's objects in the test's schema: columns, enum labels in order, functions (whitespace-normalised
    bodies), triggers, indexes, constraints."""
    eng = sa.create_engine(url)
    with eng.connect() as c:
        ns = c.execute(sa.text("SELECT current_schema()")).scalar()
        q = {
            "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default FROM "
                       "information_schema.columns WHERE table_schema = :ns AND table_name LIKE 'procrastinate%' "
                       "ORDER BY 1, 2",
            "enums": "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid JOIN "
                     "pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = :ns ORDER BY 1, e.enumsortorder",
            "functions": "SELECT p.proname, pg_get_function_identity_arguments(p.oid), "
                         "md5(regexp_replace(p.prosrc, '\\s+', ' ', 'g')) FROM pg_proc p JOIN pg_namespace n ON "
                         "n.oid = p.pronamespace WHERE n.nspname = :ns ORDER BY 1, 2",
            "triggers": "SELECT c.relname, t.tgname, t.tgfoid::regproc::text FROM pg_trigger t JOIN pg_class c ON "
                        "c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :ns AND "
                        "NOT t.tgisinternal ORDER BY 1, 2",
            "indexes": "SELECT tablename, indexname, replace(indexdef, :ns || '.', '') FROM pg_indexes WHERE "
                       "schemaname = :ns AND tablename LIKE 'procrastinate%' ORDER BY 1, 2",
            "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                           "WHERE connamespace = (SELECT oid FROM pg_namespace WHERE nspname = :ns) ORDER BY 1, 2",
        }
        out = {k: [tuple(r) for r in c.execute(sa.text(v), {"ns": ns})] for k, v in q.items()}
    eng.dispose()
    return out


def config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\ndatabase_url = "{url}"\n[[sources]]\nauthor = "acme"\n')
    return cfg


def box_for(url: str, tmp_path: Path) -> Q.Box:
    s = settings_mod.from_mapping({"database_url": url, "data_dir": str(tmp_path / "data"),
                                   "sources": [{"author": "acme"}]}, env={}, free_disk=10**12)
    return Q.Box(s, hub=object(), poll=False)


def test_a_database_of_the_previous_schema_is_refused_then_upgraded_by_migrate(pg_url, tmp_path,
                                                                                capsys) -> None:
    made_by_procrastinate_3_3(pg_url)
    st = QS.open_store(pg_url)  # opening it with the installed procrastinate does not touch the queue schema
    assert st.queue_state() == (NEW_IN_PIN, [])
    box = box_for(pg_url, tmp_path)
    with pytest.raises(StateError, match=r"older than procrastinate .*03\.04\.00_01.*run `ggufbot migrate`"):
        asyncio.run(asyncio.wait_for(box.serve(install_signals=False), 15))  # started workers: a timeout
    assert not box.workers  # no worker was started

    cfg = config(tmp_path, pg_url)
    assert main(["migrate", "--check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "2 migration(s) not applied: " + ", ".join(NEW_IN_PIN) in out
    assert main(["migrate", "--config", str(cfg)]) == 0
    assert "applied " + ", ".join(NEW_IN_PIN) in capsys.readouterr().out
    assert st.queue_state() == ([], [])
    QS.check_schema(st)  # a worker may start now
    assert main(["migrate", "--check", "--config", str(cfg)]) == 0  # and again: nothing left
    assert main(["migrate", "--config", str(cfg)]) == 0
    assert "queue schema (procrastinate " in capsys.readouterr().out

    with postgres_url() as fresh_url:
        QS.open_store(fresh_url).close()  # made by the installed procrastinate
        assert catalogue(pg_url) == catalogue(fresh_url)
    st.close()


def test_a_database_made_before_the_record_counts_as_the_pins_floor(pg_url, tmp_path) -> None:
    st = QS.open_store(pg_url)
    with st.engine.begin() as c:
        assert {r[0] for r in c.execute(sa.text("SELECT name FROM queue_migrations"))} == set(QS.INSTALLED.migrations)
        c.execute(sa.text("DROP TABLE queue_migrations"))  # as made by ggufbot before this record
    assert st.queue_state() == ([n for n in QS.INSTALLED.migrations if S.migration_version(n) > QS.BASELINE], [])
    assert st.migrate_queue() == []  # procrastinate 3.10: nothing after the floor to apply
    with st.engine.connect() as c:
        assert {r[0] for r in c.execute(sa.text("SELECT name FROM queue_migrations"))} == set(QS.INSTALLED.migrations)
    st.close()


def test_a_schema_migrated_by_a_newer_procrastinate_is_refused(pg_url, tmp_path) -> None:
    st = QS.open_store(pg_url)
    with st.engine.begin() as c:
        c.execute(sa.text("INSERT INTO queue_migrations (name, procrastinate, applied_at) "
                          "VALUES ('03.99.00_01_pre_future.sql', '3.99.0', 0)"))
    with pytest.raises(StateError, match=r"03\.99\.00_01_pre_future\.sql.*upgrade this box"):
        QS.check_schema(st)
    st.close()
