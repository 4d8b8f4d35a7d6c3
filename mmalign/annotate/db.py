"""The annotation database: SQLAlchemy 2 models, engine set-up and a minimal migration mechanism.

SQLite (one file) by default, any SQLAlchemy URL otherwise. PostgreSQL (``postgresql+psycopg://user@host/db``,
the ``postgres`` extra) runs the whole test suite of the app (``make test-postgres``); the code path is the same
except the SQLite connection pragmas below, the migrations' advisory lock and the assignment paths' row lock
(mmalign/annotate/assign.py).

Migrations: not Alembic (an ``alembic.ini`` + ``env.py`` + script folder shipped as package data, for a schema
this small), but the same idea in a few lines: :data:`MIGRATIONS` is an ordered list of ``(version,
description, function(connection))``; the ``schema_version`` table records the versions applied, and
:func:`migrate` applies the missing ones in order, each in its own transaction. Migration 1 creates the tables
from the current models; each later one alters a database made by an earlier version and first looks at what is
there (a fresh database already has the column), so fresh and upgraded databases end up alike. A schema change
appends a migration and never edits an earlier one (test: ``tests/annotate/test_core.py``).

Writes on SQLite: WAL journal, ``busy_timeout`` and ``BEGIN IMMEDIATE`` transactions, so that concurrent
requests (the server's thread pool, or a CLI command while the server runs) queue for the write lock instead of
failing with "database is locked" or reading a snapshot that a concurrent writer invalidates.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import MMAlignError


class AnnotateError(MMAlignError):
    """A request or command the annotation app refuses; the message says what is wrong. ``status``: the HTTP
    status the web app answers it with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Annotator(Base):
    """A person (``kind="human"``) or a model labelling items (``kind="ai"``, e.g. ``reward:toyworld``)."""

    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(8), default="human")
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Task(Base):
    """A set of items to judge: ``kind`` is pairwise, kwise or rating; ``media`` image, video, audio, multiview.

    ``roots``: the folders its media may be served from (nothing outside them is ever read); an option's
    ``"root"`` (default 0) says which. ``mode``: ``None``, or ``"arena"`` (schema v3): items are generator
    battles, handed out at random, the generators revealed after the vote, and a live leaderboard."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    media: Mapped[str] = mapped_column(String(16))
    judgements: Mapped[int] = mapped_column(Integer, default=3)
    dimensions: Mapped[list] = mapped_column(JSON, default=list)
    instructions: Mapped[str] = mapped_column(Text, default="")
    roots: Mapped[list] = mapped_column(JSON, default=list)
    source: Mapped[dict] = mapped_column(JSON, default=dict)
    gold_every: Mapped[int] = mapped_column(Integer, default=5)
    lease_seconds: Mapped[float] = mapped_column(Float, default=1800.0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    mode: Mapped[str | None] = mapped_column(String(16), nullable=True)  # "arena" (schema v3)


class Item(Base):
    """One question: a prompt and its options. ``options``: a list of ``{"path": rel}`` (or ``{"views": [rel,
    ...]}`` for multi-view), with an optional ``"model"`` (the generator, for arena votes). ``gold``: the known
    answer of a gold question (never sent to annotators). ``meta``: where it came from (e.g. ``index`` of a
    ``mmalign label`` group)."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    options: Mapped[list] = mapped_column(JSON)
    gold: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    routed: Mapped[str | None] = mapped_column(String(8), nullable=True)  # "ai": labelled by a reward (schema v2)


class Assignment(Base):
    """An item handed to one annotator; at most one per (item, annotator): the judgements stay independent."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_assignment_item_annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    order: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float] = mapped_column(Float)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class Judgement(Base):
    """One recorded answer. Unique per assignment and per (item, annotator): a retried or replayed submission
    can never count twice."""

    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_judgement_item_annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    answer: Mapped[dict] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(8))
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    correct: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    applied_at: Mapped[float] = mapped_column(Float)


# ---------------------------------------------------------------- migrations

_V1_TABLES = ["settings", "annotators", "tasks", "items", "assignments", "judgements"]


def _v1(conn: Connection) -> None:
    Base.metadata.create_all(conn, tables=[Base.metadata.tables[name] for name in _V1_TABLES])
    conn.execute(
        Setting.__table__.insert().values(key="secret", value=secrets.token_hex(32)),
    )


def _v2(conn: Connection) -> None:
    columns = {c["name"] for c in inspect(conn).get_columns("items")}
    if "routed" not in columns:  # a database made by version 1; a fresh one has it from _v1 already
        conn.execute(text("ALTER TABLE items ADD COLUMN routed VARCHAR(8)"))


def _v3(conn: Connection) -> None:
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "mode" not in columns:  # a database made by version 1 or 2
        conn.execute(text("ALTER TABLE tasks ADD COLUMN mode VARCHAR(16)"))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "annotators, tasks, items, assignments, judgements, settings", _v1),
    (2, "items.routed: items labelled by a reward are not handed to people (hybrid routing)", _v2),
    (3, "tasks.mode: arena tasks (anonymous generator battles, live leaderboard)", _v3),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def applied_versions(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, "schema_version"):
            return []
        return [row[0] for row in conn.execute(select(SchemaVersion.version).order_by(SchemaVersion.version))]


MIGRATION_LOCK = 0x6D6D616C69676E  # "mmalign": the PostgreSQL advisory lock key of migrations


def _serialise_migrations(conn: Connection) -> None:
    """Make concurrent migrators (``init`` run twice at once, a ``serve`` starting beside ``migrate``) take turns:
    on SQLite the transaction's ``BEGIN IMMEDIATE`` does it; on PostgreSQL (transactional DDL, but no
    database-wide write lock) a transaction-scoped advisory lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def migrate(engine: Engine) -> list[int]:
    """Apply the missing migrations in order, each in its own transaction; returns the versions applied now (by
    this call: a version that a concurrent migrator applied meanwhile is skipped)."""
    with engine.begin() as conn:
        _serialise_migrations(conn)
        SchemaVersion.__table__.create(conn, checkfirst=True)
    done = set(applied_versions(engine))
    applied = []
    for version, description, function in MIGRATIONS:
        if version in done:
            continue
        with engine.begin() as conn:
            _serialise_migrations(conn)
            if conn.scalar(select(SchemaVersion.version).where(SchemaVersion.version == version)) is not None:
                continue  # applied by a concurrent migrator while this one waited for the lock
            function(conn)
            conn.execute(
                SchemaVersion.__table__.insert().values(
                    version=version, description=description, applied_at=time.time()
                )
            )
        applied.append(version)
    return applied


def check_schema(engine: Engine) -> None:
    versions = applied_versions(engine)
    if not versions:
        raise AnnotateError(f"{engine.url!r}: not an annotation database; run `mmalign annotate init` first")
    if max(versions) < SCHEMA_VERSION:
        raise AnnotateError(
            f"database schema is version {max(versions)}, this mmalign needs {SCHEMA_VERSION}: "
            "run `mmalign annotate migrate`"
        )
    if max(versions) > SCHEMA_VERSION:
        raise AnnotateError(f"database schema version {max(versions)} is newer than this mmalign ({SCHEMA_VERSION})")


# ---------------------------------------------------------------- engine and sessions


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a file path (a path means SQLite)."""
    text_db = str(db)
    if "://" in text_db:
        make_url(text_db)  # raises a clear ArgumentError on a malformed URL
        return text_db
    return f"sqlite:///{Path(text_db).expanduser().resolve()}"


def _use_wal(cursor: Any, attempts: int = 100) -> None:
    """Put a SQLite database in WAL mode, retrying while another connection holds it.

    The mode is stored in the file, so only the first connection to a fresh database changes it; but connections
    opened at the same moment (``init`` run twice at once, a server's first requests) all try, and SQLite answers
    the losers "database is locked" at once, without waiting out ``busy_timeout`` (measured: 7 % of rounds of 4
    threads opening one fresh file). The mode is read first, then set, retrying with a growing pause."""
    for attempt in range(attempts):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(min(0.005 * (attempt + 1), 0.1))


def make_engine(db: str | Path) -> Engine:
    url = database_url(db)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None  # let the "begin" hook below open the transaction
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=60000")
            _use_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:  # reads (Database.read) take no write lock
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("mmalign_read") else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """An engine and its session factory; ``with db.session() as s:`` commits on success, rolls back on error."""

    def __init__(self, db: str | Path, *, check: bool = True):
        self.url = database_url(db)
        self.engine = make_engine(db)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = sessionmaker(self.engine.execution_options(mmalign_read=True), expire_on_commit=False)
        if check:
            check_schema(self.engine)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: on SQLite a deferred transaction that does not queue for the write lock."""
        with self.read_sessions() as session, session.begin():
            yield session

    def setting(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(Setting, key)
            return None if row is None else row.value

    def dispose(self) -> None:
        self.engine.dispose()


def init_database(db: str | Path) -> tuple[Database, list[int]]:
    """Create (or bring up to date) the database; returns it and the migrations applied now."""
    url = database_url(db)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(db)
    applied = migrate(engine)
    engine.dispose()
    return Database(db), applied


def ping(db: Database) -> None:
    with db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
