"""Users (argon2 password hashes), API keys (shown once, stored as SHA-256) and web sessions."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, sessionmaker

from .db import ApiKey, User, WebSession, utcnow

KEY_PREFIX = "e5k"
_hasher = PasswordHasher()
# Verifying against this when the user does not exist keeps "no such user" as slow as "wrong password".
_DUMMY_HASH = _hasher.hash("e5kit-no-such-user")


class AccountError(ValueError):
    """A user or key that cannot be created or found (the message is safe to show)."""


@dataclass(frozen=True)
class Identity:
    """Who is calling: a database key, a key-file key, or a logged-in user (playground).

    It is the service's :class:`e5kit.server.Identity` (what its ``authenticate`` returns and its
    ``meter`` receives): ``key_id`` names the caller in the ledger and in metrics (never the secret),
    ``account`` is the account id. Not a subclass, so the account CLI does not import the server.
    """

    key_id: str
    user_id: int | None = None
    api_key_id: int | None = None  # the api_keys row of a database key
    kind: str = "key"  # "key" (database), "file" (key file / --api-key), "session"
    request_key: str | None = None  # the client's Idempotency-Key, if any
    limits: tuple = ()  # ((scope, Limits), ...) checked by limits.admit / charged by the ledger

    @property
    def account(self) -> str | None:
        return None if self.user_id is None else str(self.user_id)

    def __str__(self) -> str:  # log lines use the label
        return self.key_id


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", "surrogateescape")).hexdigest()


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if not (3 <= len(email) <= 320) or "@" not in email or any(c.isspace() for c in email):
        raise AccountError("an account name must look like an email address (name@host)")
    return email


def create_user(db: sessionmaker, email: str, password: str, *, rps_limit: int | None = None,
                tpm_limit: int | None = None, monthly_quota: int | None = None) -> User:
    email = normalize_email(email)
    if len(password) < 8:
        raise AccountError("a password needs at least 8 characters")
    with db.begin() as s:
        if s.scalar(select(User).where(User.email == email)) is not None:
            raise AccountError(f"account {email} exists already")
        user = User(email=email, password_hash=_hasher.hash(password), rps_limit=rps_limit, tpm_limit=tpm_limit,
                    monthly_quota=monthly_quota, disabled=False)
        s.add(user)
    return user


def set_password(db: sessionmaker, email: str, password: str) -> None:
    if len(password) < 8:
        raise AccountError("a password needs at least 8 characters")
    with db.begin() as s:
        user = _user(s, email)
        user.password_hash = _hasher.hash(password)
        s.query(WebSession).filter(WebSession.user_id == user.id).delete()  # log out everywhere


def set_limits(db: sessionmaker, email: str, **limits) -> User:
    with db.begin() as s:
        user = _user(s, email)
        for k, v in limits.items():
            setattr(user, k, v)
    return user


def _user(s: Session, email: str) -> User:
    user = s.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        raise AccountError(f"no account {email}")
    return user


def get_user(db: sessionmaker, email: str) -> User:
    with db() as s:
        return _user(s, email)


def list_users(db: sessionmaker) -> list[User]:
    with db() as s:
        return list(s.scalars(select(User).order_by(User.id)))


def authenticate(db: sessionmaker, email: str, password: str) -> User | None:
    """The user if the password matches (argon2, constant work whether or not the user exists)."""
    try:
        email = normalize_email(email)
    except AccountError:
        email = ""
    with db() as s:
        user = s.scalar(select(User).where(User.email == email)) if email else None
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        with db.begin() as s:
            s.get(User, user.id).password_hash = _hasher.hash(password)
    return user


# ---- API keys --------------------------------------------------------------------------------------

def create_key(db: sessionmaker, email_or_id: str | int, label: str = "", *, rps_limit: int | None = None,
               tpm_limit: int | None = None, monthly_quota: int | None = None) -> tuple[str, ApiKey]:
    """A new key for a user: (the secret key, to show once; its row, which keeps only a hash)."""
    if len(label) > 200:
        raise AccountError("a key label has at most 200 characters")
    public_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    with db.begin() as s:
        user = s.get(User, email_or_id) if isinstance(email_or_id, int) else _user(s, email_or_id)
        if user is None:
            raise AccountError("no such account")
        key = ApiKey(public_id=public_id, secret_hash=_sha256(secret), user_id=user.id, label=label,
                     rps_limit=rps_limit, tpm_limit=tpm_limit, monthly_quota=monthly_quota)
        s.add(key)
    return f"{KEY_PREFIX}_{public_id}_{secret}", key


def parse_key(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def check_key(s: Session, token: str) -> ApiKey | None:
    """The live key (and its user loaded) for a bearer token, else None."""
    parsed = parse_key(token)
    if parsed is None:
        return None
    public_id, secret = parsed
    key = s.scalar(select(ApiKey).options(joinedload(ApiKey.user)).where(ApiKey.public_id == public_id))
    if key is None or not hmac.compare_digest(key.secret_hash, _sha256(secret)):
        return None
    if key.revoked_at is not None or key.user.disabled:
        return None
    return key


def list_keys(db: sessionmaker, email_or_id: str | int | None = None) -> list[ApiKey]:
    with db() as s:
        q = select(ApiKey).order_by(ApiKey.id)
        if email_or_id is not None:
            uid = email_or_id if isinstance(email_or_id, int) else _user(s, email_or_id).id
            q = q.where(ApiKey.user_id == uid)
        keys = list(s.scalars(q))
        for k in keys:
            _ = k.user.email  # load while the session is open
        return keys


def revoke_key(db: sessionmaker, public_id: str, user_id: int | None = None) -> ApiKey:
    """Revoke a key (by its public id); with ``user_id``, only that user's own key."""
    with db.begin() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.public_id == public_id))
        if key is None or (user_id is not None and key.user_id != user_id):
            raise AccountError(f"no key {public_id}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
    return key


# ---- web sessions ---------------------------------------------------------------------------------

def create_session(db: sessionmaker, user_id: int, ttl: dt.timedelta) -> tuple[str, str]:
    """(session token for the cookie, CSRF token for the forms). Only the token's hash is stored."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    with db.begin() as s:
        s.add(WebSession(token_hash=_sha256(token), user_id=user_id, csrf_token=csrf, created_at=now,
                         expires_at=now + ttl))
    return token, csrf


def get_session(db: sessionmaker, token: str | None) -> tuple[WebSession, User] | None:
    if not token or len(token) > 200:
        return None
    with db() as s:
        ws = s.get(WebSession, _sha256(token))
        if ws is None or ws.expires_at <= utcnow():
            return None
        user = s.get(User, ws.user_id)
        if user is None or user.disabled:
            return None
        return ws, user


def end_session(db: sessionmaker, token: str | None) -> None:
    if token:
        with db.begin() as s:
            s.query(WebSession).filter(WebSession.token_hash == _sha256(token)).delete()
