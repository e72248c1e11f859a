"""`e5kit accounts ...`, `e5kit keys ...`, and the `e5kit serve` options that turn the service on."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import click

DB_HELP = "SQLAlchemy URL of the account database: sqlite:///FILE or postgresql://user@host/db."


def _url(database_url: str | None) -> str:
    from .db import DEFAULT_URL

    return database_url or os.environ.get("E5KIT_DATABASE_URL") or DEFAULT_URL


def _price(ctx, param, values) -> dict[str, float]:
    out = {}
    for v in values:
        name, _, price = v.rpartition("=")
        try:
            out[name] = float(price)
            if not name or out[name] < 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"expected MODEL=USD_PER_MILLION_TOKENS, got {v!r}")
    return out


def service_options(f):
    """The options `e5kit serve` gets from this package (all off unless --database-url is given)."""
    opts = [
        click.option("--database-url", default=None, help=DB_HELP + " Turns on accounts, the ledger, limits and pages."),
        click.option("--price", "prices", multiple=True, callback=_price, metavar="MODEL=USD",
                     help="Price per million tokens for a served model (repeatable; default: the built-in "
                          "price list, e.g. e5-large-v2 $0.010)."),
        click.option("--key-rps", type=click.IntRange(1), default=None, help="Default requests/s per key."),
        click.option("--key-tpm", type=click.IntRange(1), default=None, help="Default tokens/min per key."),
        click.option("--key-monthly-quota", type=click.IntRange(1), default=None, help="Default tokens/month per key."),
        click.option("--account-rps", type=click.IntRange(1), default=None, help="Default requests/s per account."),
        click.option("--account-tpm", type=click.IntRange(1), default=None, help="Default tokens/min per account."),
        click.option("--account-monthly-quota", type=click.IntRange(1), default=None,
                     help="Default tokens/month per account."),
        click.option("--session-hours", type=click.FloatRange(0.01), default=12.0, help="Login session lifetime."),
        click.option("--cookie-secure/--no-cookie-secure", default=True,
                     help="Mark the session cookie Secure (keep on behind HTTPS)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


SERVICE_OPTIONS = ("database_url", "prices", "key_rps", "key_tpm", "key_monthly_quota", "account_rps", "account_tpm",
                   "account_monthly_quota", "session_hours", "cookie_secure")


def app_from_options(models, server_config, keys, *, database_url, prices, key_rps, key_tpm, key_monthly_quota,
                     account_rps, account_tpm, account_monthly_quota, session_hours, cookie_secure):
    """What `e5kit serve` builds instead of the plain server when --database-url is given."""
    from .app import ServiceConfig, create_service_app
    from .limits import Limits

    config = ServiceConfig(database_url=database_url, prices=prices,
                           default_price=server_config.price_per_million or None,
                           key_limits=Limits(key_rps, key_tpm, key_monthly_quota),
                           account_limits=Limits(account_rps, account_tpm, account_monthly_quota),
                           session_hours=session_hours, cookie_secure=cookie_secure)
    with database_errors(database_url):
        return create_service_app(models, config, server_config, keys)


@contextmanager
def database_errors(database_url: str):
    """A bad URL, an unreachable server or no permission as one CLI error, without the URL's password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as e:
        try:
            shown = make_url(database_url).render_as_string(hide_password=True)
        except SQLAlchemyError:
            shown = "(unparsable URL)"
        lines = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise click.ClickException(f"cannot open the account database {shown}: {type(e).__name__}"
                                   + (f" ({lines[0]})" if lines else ""))


def _db(database_url):
    from .db import open_db

    url = _url(database_url)
    with database_errors(url):
        return open_db(url)[1]


def _fail(e: Exception):
    raise click.ClickException(str(e))


db_option = click.option("--database-url", envvar="E5KIT_DATABASE_URL", default=None,
                         help=DB_HELP + " Default: sqlite:///e5kit-service.db")


@click.group("accounts")
def accounts_cli():
    """Create and list user accounts of the hosted service."""


@accounts_cli.command("create")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True, envvar="E5KIT_PASSWORD")
@click.option("--rps", type=click.IntRange(1), default=None, help="Requests/s limit of the account.")
@click.option("--tpm", type=click.IntRange(1), default=None, help="Tokens/min limit of the account.")
@click.option("--monthly-quota", type=click.IntRange(1), default=None, help="Tokens per month.")
@db_option
def accounts_create(email, password, rps, tpm, monthly_quota, database_url):
    """Create an account (the password is hashed with argon2)."""
    from .accounts import AccountError, create_user

    try:
        u = create_user(_db(database_url), email, password, rps_limit=rps, tpm_limit=tpm, monthly_quota=monthly_quota)
    except AccountError as e:
        _fail(e)
    click.echo(f"created account {u.email} (id {u.id})")


@accounts_cli.command("list")
@db_option
def accounts_list(database_url):
    """List accounts and their limits."""
    from .accounts import list_users

    for u in list_users(_db(database_url)):
        click.echo(f"{u.id}\t{u.email}\tcreated {u.created_at:%Y-%m-%d %H:%M}\trps={u.rps_limit} tpm={u.tpm_limit} "
                   f"monthly_quota={u.monthly_quota}{' disabled' if u.disabled else ''}")


@accounts_cli.command("set-limits")
@click.argument("email")
@click.option("--rps", type=click.IntRange(1), default=None)
@click.option("--tpm", type=click.IntRange(1), default=None)
@click.option("--monthly-quota", type=click.IntRange(1), default=None)
@db_option
def accounts_limits(email, rps, tpm, monthly_quota, database_url):
    """Set an account's limits (options not given become unlimited / the server default)."""
    from .accounts import AccountError, set_limits

    try:
        set_limits(_db(database_url), email, rps_limit=rps, tpm_limit=tpm, monthly_quota=monthly_quota)
    except AccountError as e:
        _fail(e)
    click.echo(f"limits of {email}: rps={rps} tpm={tpm} monthly_quota={monthly_quota}")


@accounts_cli.command("password")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True, envvar="E5KIT_PASSWORD")
@db_option
def accounts_password(email, password, database_url):
    """Set a new password (ends the account's sessions)."""
    from .accounts import AccountError, set_password

    try:
        set_password(_db(database_url), email, password)
    except AccountError as e:
        _fail(e)
    click.echo(f"password of {email} changed")


@click.group("keys")
def keys_cli():
    """Create, list and revoke API keys (keys are shown once and stored hashed)."""


@keys_cli.command("create")
@click.argument("email")
@click.option("--label", default="", help="A name for the key (shown in listings).")
@click.option("--rps", type=click.IntRange(1), default=None)
@click.option("--tpm", type=click.IntRange(1), default=None)
@click.option("--monthly-quota", type=click.IntRange(1), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print {id, key} as JSON.")
@db_option
def keys_create(email, label, rps, tpm, monthly_quota, as_json, database_url):
    """Create a key for an account and print it (the only time it is shown)."""
    from .accounts import AccountError, create_key

    try:
        secret, key = create_key(_db(database_url), email, label, rps_limit=rps, tpm_limit=tpm,
                                 monthly_quota=monthly_quota)
    except AccountError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"id": key.public_id, "key": secret, "label": label}))
    else:
        click.echo(f"key {key.public_id} for {email}: {secret}\n(store it now: it cannot be shown again)")


@keys_cli.command("list")
@click.argument("email", required=False)
@db_option
def keys_list(email, database_url):
    """List keys (all, or one account's): id, owner, label, created, last used, state."""
    from .accounts import AccountError, list_keys

    try:
        keys = list_keys(_db(database_url), email)
    except AccountError as e:
        _fail(e)
    for k in keys:
        used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        click.echo(f"{k.public_id}\t{k.user.email}\t{k.label or '-'}\tcreated {k.created_at:%Y-%m-%d %H:%M}\t"
                   f"last used {used}\t{state}")


@keys_cli.command("revoke")
@click.argument("key_id")
@db_option
def keys_revoke(key_id, database_url):
    """Revoke a key by its id (the part after e5k_)."""
    from .accounts import AccountError, revoke_key

    try:
        revoke_key(_db(database_url), key_id)
    except AccountError as e:
        _fail(e)
    click.echo(f"revoked key {key_id}")
