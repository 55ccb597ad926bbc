"""The fleet's database through SQLAlchemy Core: SQLite (a file, the embedded default) or PostgreSQL
(several dashboard/worker processes), one code path for both.

``make_engine(target)``: ``target`` is a file path (SQLite), ``":memory:"``, ``sqlite:///...`` or
``postgresql://...`` (driven by psycopg 3). Every SQLite transaction starts with ``BEGIN IMMEDIATE``,
so a read-modify-write holds the write lock from its first read, as ``SELECT ... FOR UPDATE`` does
on PostgreSQL (:func:`for_update` adds that clause where the dialect has it).

SQLAlchemy is imported on first use: ``pip install 'mgrpc[fleet]'`` (``'mgrpc[postgres]'`` adds psycopg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION", "TABLES", "for_update", "insert_ignore", "is_database_url", "make_engine", "metadata",
    "sqlalchemy", "upsert",
]  # fmt: skip

_META: Any = None
TABLES: dict[str, Any] = {}
# 1: SQLite only, tables ``devices``, ``bundles``, ``rollouts`` (jobs inside the rollout's document) and
#    ``shadows``, bundle bytes in ``<file>.bundles/<sha>.zip`` (migrated by FleetDB on open).
# 2: these tables; ``fleet_meta`` holds {"schema": "2"}.
SCHEMA_VERSION = 2


def sqlalchemy() -> Any:
    """The sqlalchemy module (ImportError naming the extra if it is missing)."""
    try:
        import sqlalchemy as sa
    except ImportError as e:
        raise ImportError(f"the fleet database needs SQLAlchemy: pip install 'mgrpc[fleet]' ({e})") from None
    return sa


def is_database_url(target: str | Path) -> bool:
    """Whether ``target`` is a database URL rather than a SQLite file path."""
    return isinstance(target, str) and "://" in target


def metadata() -> Any:
    """The fleet's tables (created on first use): ``fleet_devices``, ``fleet_bundles``, ``fleet_rollouts``,
    ``fleet_jobs``, ``fleet_workers``, ``fleet_leases``, ``fleet_meta`` (the schema version) and ``shadows``."""
    global _META
    if _META is not None:
        return _META
    sa = sqlalchemy()
    m = sa.MetaData()
    TABLES["devices"] = sa.Table(
        "fleet_devices", m,
        sa.Column("id", sa.String(200), primary_key=True), sa.Column("doc", sa.Text, nullable=False),
        sa.Column("mtime", sa.Float, nullable=False, default=0.0),
    )  # fmt: skip
    TABLES["bundles"] = sa.Table(
        "fleet_bundles", m,
        sa.Column("sha", sa.String(64), primary_key=True), sa.Column("doc", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )  # fmt: skip
    TABLES["rollouts"] = sa.Table(
        "fleet_rollouts", m,
        sa.Column("id", sa.String(64), primary_key=True), sa.Column("doc", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False), sa.Column("created_at", sa.Float, nullable=False),
    )  # fmt: skip
    TABLES["jobs"] = sa.Table(
        "fleet_jobs", m,
        sa.Column("rollout", sa.String(64), primary_key=True), sa.Column("device", sa.String(200), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),  # the device's place in the rollout
        sa.Column("state", sa.String(32), nullable=False), sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("doc", sa.Text, nullable=False), sa.Column("mtime", sa.Float, nullable=False),
        sa.Index("fleet_jobs_device", "device", "state"), sa.Index("fleet_jobs_mtime", "mtime"),
    )  # fmt: skip
    TABLES["workers"] = sa.Table(
        "fleet_workers", m,
        sa.Column("id", sa.String(64), primary_key=True), sa.Column("seen_at", sa.Float, nullable=False),
        sa.Column("info", sa.Text, nullable=False, default=""),
    )  # fmt: skip
    # Unused since workers split devices by hash (earlier workers held a shadow lease here); kept so databases
    # written by that version keep the same tables.
    TABLES["leases"] = sa.Table(
        "fleet_leases", m,
        sa.Column("name", sa.String(64), primary_key=True), sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires", sa.Float, nullable=False),
    )  # fmt: skip
    TABLES["meta"] = sa.Table(
        "fleet_meta", m,
        sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False),
    )  # fmt: skip
    TABLES["shadows"] = sa.Table(
        "shadows", m, sa.Column("thing", sa.String(200), primary_key=True), sa.Column("doc", sa.Text, nullable=False),
    )  # fmt: skip
    _META = m
    return m


def make_engine(target: str | Path) -> Any:
    """An engine for a SQLite path/``":memory:"`` or a database URL; the tables are created if missing."""
    sa = sqlalchemy()
    url = str(target)
    kw: dict[str, Any] = {}
    if not is_database_url(target):
        url = "sqlite://" if url == ":memory:" else f"sqlite:///{url}"
    elif url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if url == "sqlite://":
            from sqlalchemy.pool import StaticPool

            kw["poolclass"] = StaticPool  # one connection: the in-memory database lives in it
    else:
        kw["pool_recycle"] = 1800
    engine = sa.create_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
            if url != "sqlite://":
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    metadata().create_all(engine)
    return engine


def for_update(stmt: Any, engine: Any) -> Any:
    """``SELECT ... FOR UPDATE`` where the dialect has it (SQLite's BEGIN IMMEDIATE already locks)."""
    return stmt if engine.dialect.name == "sqlite" else stmt.with_for_update()


def _insert(engine: Any) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def insert_ignore(table: Any, engine: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the engine's dialect (call ``.values(...)`` on it)."""
    return _insert(engine)(table).on_conflict_do_nothing()


def upsert(table: Any, engine: Any, values: dict[str, Any], keys: list[str]) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` setting every other column."""
    stmt = _insert(engine)(table).values(**values)
    return stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in values.items() if k not in keys})
