"""A real browser (Debian's Chromium driven by Playwright) on the model page: sees the price and the
login requirement, logs in, adds three inputs, toggles normalize, runs, and reads the same vectors
as the library plus a heatmap. The screenshot is saved under test-artifacts/."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest

from conftest import ARTIFACTS, PASSWORD

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    pw_api = pytest.importorskip("playwright.sync_api", reason="[required] playwright is not installed")
    if not shutil.which("chromium") and not __import__("os").path.exists(CHROMIUM):
        pytest.skip("[required] Chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="e5kit-chromium-")
    with pw_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield ctx
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


def test_playground_in_chromium(browser, sqlite_service, tiny_bert):
    server, acc = sqlite_service
    acc.user("browser@example.com")
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    assert "$0.010 per million tokens" in page.inner_text("#price")
    assert "512" in page.inner_text("#max-tokens")
    assert "You need to login to use this model" in page.inner_text("#login-needed")
    assert page.is_disabled("#run")

    page.click("#login-needed a")
    page.fill("#email", "browser@example.com")
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_selector("#logout")  # back on the model page, logged in
    assert page.url == server.url + "/"
    assert page.locator("#login-needed").count() == 0 and page.is_enabled("#run")

    texts = ["how much protein should a female eat", "summit define", "the highest point of a mountain"]
    start = page.locator(".input-text").count()
    for t in texts:  # add three inputs, then remove the example rows the page starts with
        page.click("#add-input")
        page.locator(".input-text").last.fill(t)
    assert page.locator(".input-text").count() == start + 3
    for _ in range(start):
        page.locator(".remove-input").first.click()
    assert [a.input_value() for a in page.locator(".input-text").all()] == texts
    page.uncheck("#normalize")
    page.click("#run")
    page.wait_for_selector("#heatmap .heat")  # (wait_for_function would need unsafe-eval under our CSP)
    result = page.evaluate("window.e5kitResult")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    from e5kit import E5

    lib = E5(str(tiny_bert)).encode_queries(texts, normalize_embeddings=False)
    got = np.array(result["vectors"], dtype=np.float32)
    np.testing.assert_allclose(got, lib, rtol=1e-4, atol=1e-5)
    assert result["normalize"] is False and not np.allclose(np.linalg.norm(got, axis=1), 1.0)
    norms = [float(x) for x in page.locator(".norm").all_inner_texts()]
    np.testing.assert_allclose(norms, np.linalg.norm(lib, axis=1), atol=1e-4)
    heat = page.locator(".heat")
    assert heat.count() == 9
    cos = (lib / np.linalg.norm(lib, axis=1, keepdims=True)) @ (lib / np.linalg.norm(lib, axis=1, keepdims=True)).T
    values = np.array([float(heat.nth(i).get_attribute("data-value")) for i in range(9)]).reshape(3, 3)
    np.testing.assert_allclose(values, cos, atol=1e-4)
    assert result["total"] == sum(result["counts"])
    assert f"{result['total']} tokens" in page.inner_text("#summary")
    # the run is in the ledger, and the account page shows it
    page.goto(server.url + "/account")
    assert int(page.inner_text("#total-tokens")) >= result["total"]
    assert page.locator("svg.usage-plot rect.bar").count() == 30
    page.close()
