"""Annotator accounts: each person has a secret token (shown once; only its SHA-256 is stored)."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .db import AnnotateError, Annotator, Database

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "mma_" + secrets.token_urlsafe(24)


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise AnnotateError(
            f"bad annotator name {name!r}: letters, digits and _ . : - (at most 64), not starting with a sign"
        )
    return name


def add_user(db: Database, name: str, *, admin: bool = False, kind: str = "human") -> str:
    """Create an annotator and return its token (the only time it is seen). AI labellers (``kind="ai"``) get no
    token: they write through the library, never through the web app."""
    check_name(name)
    if kind not in ("human", "ai"):
        raise AnnotateError(f"annotator kind must be human or ai, got {kind!r}")
    token = new_token() if kind == "human" else ""
    exists = AnnotateError(f"annotator {name!r} exists already (use `users token {name}` for a new token)")
    try:
        with db.session() as s:
            if s.scalar(select(Annotator).where(Annotator.name == name)) is not None:
                raise exists
            s.add(Annotator(name=name, token_hash=hash_token(token) if token else None, kind=kind, is_admin=admin))
    except IntegrityError:  # the same name added concurrently (PostgreSQL checks the unique name at the insert)
        raise exists from None
    return token


def ai_annotator(db: Database, name: str) -> int:
    """The id of the AI labeller ``name``, created when missing."""
    with db.session() as s:
        row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is not None:
            if row.kind != "ai":
                raise AnnotateError(f"{name!r} is a human annotator, not an AI labeller")
            return row.id
    try:
        add_user(db, name, kind="ai")
    except AnnotateError:  # a bad name, or a concurrent labeller of the same name made it meanwhile
        with db.read() as s:
            if s.scalar(select(Annotator.id).where(Annotator.name == name)) is None:
                raise
    return ai_annotator(db, name)


def rotate_token(db: Database, name: str) -> str:
    token = new_token()
    with db.session() as s:
        row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is None or row.kind != "human":
            raise AnnotateError(f"no human annotator {name!r}")
        row.token_hash = hash_token(token)
        row.active = True
    return token


def set_active(db: Database, name: str, active: bool) -> None:
    with db.session() as s:
        row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is None:
            raise AnnotateError(f"no annotator {name!r}")
        row.active = active


def list_users(db: Database) -> list[dict]:
    with db.session() as s:
        rows = s.scalars(select(Annotator).order_by(Annotator.id)).all()
        return [dict(name=r.name, kind=r.kind, admin=r.is_admin, active=r.active) for r in rows]


def authenticate(db: Database, token: str | None) -> Annotator | None:
    """The active human annotator holding ``token``, else None."""
    if not token or len(token) > 200:
        return None
    with db.read() as s:
        row = s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))
        if row is None or not row.active or row.kind != "human":
            return None
        s.expunge(row)
        return row
