"""Server-rendered pages: model pages with a playground, login/logout, the account page.

The playground's JavaScript calls the same ``/embed`` and ``/tokenize`` routes as API clients
(authenticated by the session cookie plus an X-CSRF-Token header), so it embeds through the
server's one path and its usage lands in the ledger like any other request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import secrets
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ..server.errors import APIError
from . import accounts
from .app import SESSION_COOKIE, Service
from .limits import count, hit

HERE = Path(__file__).resolve().parent
LOGIN_CSRF_COOKIE = "e5kit_login_csrf"
LOGIN_WINDOW_S = 300

PAPERS = {
    "e5": ("Text Embeddings by Weakly-Supervised Contrastive Pre-training (Wang et al., 2022)",
           "https://arxiv.org/abs/2212.03533"),
    "multilingual": ("Multilingual E5 Text Embeddings: A Technical Report (Wang et al., 2024)",
                     "https://arxiv.org/abs/2402.05672"),
    "instruct": ("Improving Text Embeddings with Large Language Models (Wang et al., 2024)",
                 "https://arxiv.org/abs/2401.00368"),
}


def _paper(spec, style: str) -> tuple[str, str]:
    if style == "instruct":
        return PAPERS["instruct"]
    return PAPERS["multilingual" if "multilingual" in spec.name or "multilingual" in spec.languages else "e5"]


def model_info(sm, price: float) -> dict:
    m = sm.model
    spec = m.spec
    paper, paper_url = _paper(spec, m.prompt_style)
    return {"name": sm.name, "checkpoint": spec.name, "layers": spec.layers, "dim": m.dim, "heads": spec.heads,
            "architecture": spec.architecture, "languages": spec.languages, "license": spec.license,
            "max_tokens": m.max_tokens, "prompt_style": m.prompt_style, "price": price, "paper": paper,
            "paper_url": paper_url}


def add_pages(app: FastAPI, service: Service) -> None:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["urlq"] = lambda s: quote(str(s), safe="")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="e5kit-static")
    served = app.state.service.served  # the embed service's models: name -> ServedModel
    secure = service.config.cookie_secure
    ttl = dt.timedelta(hours=service.config.session_hours)

    def session(request: Request):
        return accounts.get_session(service.db, request.cookies.get(SESSION_COOKIE))

    def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        ctx.setdefault("models", list(served))
        return templates.TemplateResponse(request, name, ctx, status_code=status,
                                          headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                                   "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"})

    def check_csrf(given: str | None, expected: str | None) -> None:
        if not given or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(403, "the form's CSRF token is missing or wrong; reload the page and try again",
                           code="csrf_failed")

    async def model_page(request: Request, sm) -> HTMLResponse:
        found = await asyncio.to_thread(session, request)
        user, csrf = (found[1], found[0].csrf_token) if found else (None, None)
        return render(request, "model.html", model=model_info(sm, service.ledger.price(sm.name)), user=user,
                      csrf=csrf)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request):
        return await model_page(request, next(iter(served.values())))

    @app.get("/models/{name:path}", response_class=HTMLResponse, include_in_schema=False)
    async def model_route(name: str, request: Request):
        sm = served.get(name)
        if sm is None:
            return render(request, "error.html", 404, message=f"no model {name} is served here", user=None)
        return await model_page(request, sm)

    def _next(value: str | None) -> str:
        # Only a path on this site (not //host or a scheme): no open redirect.
        if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
            return value
        return "/account"

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request, next: str | None = None):
        token = secrets.token_urlsafe(32)
        resp = render(request, "login.html", csrf=token, next=_next(next), user=None, error=None)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, httponly=True, samesite="strict", secure=secure,
                        path="/login")
        return resp

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        email, password = str(form.get("email", ""))[:320], str(form.get("password", ""))[:1024]
        check_csrf(str(form.get("csrf", "")), request.cookies.get(LOGIN_CSRF_COOKIE))
        where = request.client.host if request.client else "-"
        n = service.config.login_attempts
        # per account, and per client address (looser: many users may share one address)
        scopes = ((f"login-user {email.strip().lower()}", n), (f"login-ip {where}", 4 * n))

        def attempt():
            with service.db() as s:
                if any(count(s, sc, LOGIN_WINDOW_S) >= limit for sc, limit in scopes):
                    return "throttled"
            user = accounts.authenticate(service.db, email, password)
            if user is None:
                with service.db.begin() as s:
                    for sc, _ in scopes:
                        hit(s, sc, LOGIN_WINDOW_S, 1 << 30)
                return None
            return user

        user = await asyncio.to_thread(attempt)
        if user == "throttled":
            resp = render(request, "login.html", 429, csrf=form.get("csrf"), next=_next(form.get("next")), user=None,
                          error="Too many failed logins; wait a few minutes and try again.")
            resp.headers["Retry-After"] = str(LOGIN_WINDOW_S)
            return resp
        if user is None:
            return render(request, "login.html", 401, csrf=form.get("csrf"), next=_next(form.get("next")), user=None,
                          error="Wrong email or password.")
        token, _ = await asyncio.to_thread(accounts.create_session, service.db, user.id, ttl)
        resp = RedirectResponse(_next(str(form.get("next", ""))), status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, max_age=int(ttl.total_seconds()), httponly=True, samesite="strict",
                        secure=secure, path="/")
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        form = await request.form()
        found = await asyncio.to_thread(session, request)
        if found is not None:
            check_csrf(str(form.get("csrf", "")), found[0].csrf_token)
            await asyncio.to_thread(accounts.end_session, service.db, request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    async def account_page(request: Request, new_key: str | None = None, status: int = 200) -> Response:
        found = await asyncio.to_thread(session, request)
        if found is None:
            return RedirectResponse("/login?next=/account", status_code=303)
        ws, user = found
        days = await asyncio.to_thread(service.ledger.daily_tokens, user.id, 30)
        keys = await asyncio.to_thread(accounts.list_keys, service.db, user.id)
        rep = await asyncio.to_thread(service.ledger.report, user_id=user.id, group_by="month")
        return render(request, "account.html", status, user=user, csrf=ws.csrf_token, keys=keys, new_key=new_key,
                      plot=usage_svg(days), days=days, months=rep["data"], total=rep["total"])

    @app.get("/account", include_in_schema=False)
    async def account(request: Request):
        return await account_page(request)

    @app.post("/account/keys", include_in_schema=False)
    async def new_key(request: Request):
        form = await request.form()
        found = await asyncio.to_thread(session, request)
        if found is None:
            return RedirectResponse("/login?next=/account", status_code=303)
        check_csrf(str(form.get("csrf", "")), found[0].csrf_token)
        label = str(form.get("label", "")).strip()[:200]
        secret, _ = await asyncio.to_thread(accounts.create_key, service.db, found[1].id, label)
        return await account_page(request, new_key=secret, status=201)

    @app.post("/account/keys/{public_id}/revoke", include_in_schema=False)
    async def revoke(public_id: str, request: Request):
        form = await request.form()
        found = await asyncio.to_thread(session, request)
        if found is None:
            return RedirectResponse("/login?next=/account", status_code=303)
        check_csrf(str(form.get("csrf", "")), found[0].csrf_token)
        try:
            await asyncio.to_thread(accounts.revoke_key, service.db, public_id, found[1].id)
        except accounts.AccountError:
            raise APIError(404, "no such key on your account", code="key_not_found")
        service.forget_key(public_id)
        return RedirectResponse("/account", status_code=303)


def usage_svg(days: list[tuple[str, int, float]], width: int = 640, height: int = 180) -> str:
    """Tokens per day as an inline SVG bar chart (no script, no external assets)."""
    pad_l, pad_b, pad_t = 48, 22, 10
    top = max([t for _, t, _ in days] + [1])
    bw = (width - pad_l) / max(len(days), 1)
    h = height - pad_b - pad_t
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="usage-plot" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="tokens per day, last {len(days)} days">',
             f'<text x="4" y="{pad_t + 8}" class="axis">{top:,}</text>',
             f'<text x="4" y="{height - pad_b}" class="axis">0</text>',
             f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width}" y2="{height - pad_b}" class="base"/>']
    for i, (day, tokens, cost) in enumerate(days):
        bh = h * tokens / top
        x = pad_l + i * bw
        parts.append(f'<rect class="bar" data-day="{day}" data-tokens="{tokens}" x="{x + 1:.1f}" '
                     f'y="{height - pad_b - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}">'
                     f'<title>{day}: {tokens:,} tokens, ${cost:.6f}</title></rect>')
        if i % 7 == 0 or i == len(days) - 1:
            parts.append(f'<text x="{x:.1f}" y="{height - 6}" class="axis">{day[5:]}</text>')
    parts.append("</svg>")
    return "".join(parts)
