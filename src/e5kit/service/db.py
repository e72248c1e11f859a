"""The service's tables (SQLAlchemy 2 models) and the engine: SQLite file or PostgreSQL.

The schema is created and upgraded by the Alembic migrations shipped in ``migrations/``
(:func:`migrate`), never by ``create_all``, so a deployed database follows the code's history.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint, create_engine,
                        event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_URL = "sqlite:///e5kit-service.db"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)  # stored naive, always UTC


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    disabled: Mapped[bool] = mapped_column(default=False)
    # Limits for the whole account (None: the server's default).
    rps_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    monthly_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    keys: Mapped[list["ApiKey"]] = relationship(back_populates="user")


class ApiKey(Base):
    """A key is ``e5k_<public id>_<secret>``; only SHA-256 of the secret is kept (keys are random
    256-bit tokens, so a slow password hash adds nothing but latency on every request)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    rps_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    monthly_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    user: Mapped[User] = relationship(back_populates="keys")


class Usage(Base):
    """One row per successful embedding request: the ledger."""

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("key_label", "request_key", name="uq_usage_request"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    key_label: Mapped[str] = mapped_column(String(200))  # key public id, key-file label, or "session"
    request_key: Mapped[str | None] = mapped_column(String(200), nullable=True)  # Idempotency-Key
    model: Mapped[str] = mapped_column(String(200))
    inputs: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    price_per_million: Mapped[float] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float)


class Counter(Base):
    """Fixed-window counters shared by every replica (rate limits, quotas, login attempts)."""

    __tablename__ = "counters"
    scope: Mapped[str] = mapped_column(String(200), primary_key=True)
    period: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class WebSession(Base):
    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver e5kit installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8,
                               max_overflow=16)

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            # WAL: readers never block the writer; FULL: a committed ledger row survives power loss too.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (safe to run from several replicas at once)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # replicas starting together take turns
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(5500512)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def open_db(url: str) -> tuple[Engine, sessionmaker]:
    engine = make_engine(url)
    migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
