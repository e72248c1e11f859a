"""Default cookie flags (Secure, HttpOnly, SameSite=Strict) and page headers, on the app in-process
(FastAPI's TestClient over https://testserver; the model is a real tiny checkpoint)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from conftest import PASSWORD
from e5kit import E5
from e5kit.service.accounts import create_user
from e5kit.service.app import ServiceConfig, create_service_app


def test_secure_cookies_by_default(tiny_bert, tmp_path):
    app = create_service_app([("tiny", E5(str(tiny_bert)))], ServiceConfig(database_url=f"sqlite:///{tmp_path / 's.db'}"))
    service = app.state.accounts
    create_user(service.db, "cookie@example.com", PASSWORD)
    with TestClient(app, base_url="https://testserver") as c:
        form = c.get("/login")
        assert "secure" in form.headers["set-cookie"].lower()
        assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/login", data={"email": "cookie@example.com", "password": PASSWORD, "csrf": csrf},
                   follow_redirects=False)
        assert r.status_code == 303
        cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("e5kit_session=")][0]
        flags = {p.strip().split("=")[0].lower() for p in cookie.split(";")}
        assert {"secure", "httponly", "samesite"} <= flags and "samesite=strict" in cookie.lower()
        # the open redirect is closed: next must be a path on this site
        form = c.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/login", data={"email": "cookie@example.com", "password": PASSWORD, "csrf": csrf,
                                   "next": "//evil.example/"}, follow_redirects=False)
        assert r.headers["location"] == "/account"
    service.engine.dispose()
