"""The web console (/ui): its session and headers over plain HTTP, then a real headless
Chromium (Debian's, driven by Playwright) against a live API and real workers: sign in,
upload, start a distill job and watch its progress move, open the viewer and filter to
the rejected rows, cancel a running job, download a model file.

    .venv/bin/python -m pytest tests/test_console.py -q

Needs Debian's ``chromium`` (``make test`` installs it when /usr/bin/chromium is missing);
Playwright drives it through ``executable_path``, so no browser is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import httpx
import pytest

from tests.conftest import ALPACA_ROWS
from tests.redis_fixture import wait_for

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.integration

XSS = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "no chromium on PATH: `make test` installs it (apt-get install chromium)"
    return exe


def sign_in(url: str, key: str) -> httpx.Client:
    c = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    r = c.post("/ui/login", data={"api_key": key})
    assert r.status_code == 303 and r.headers["location"] == "/ui", r.text
    return c


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_session_headers_and_escaping(api, api_url, tenant_key, redis_conn):
    anon = httpx.Client(base_url=api_url, follow_redirects=False)
    r = anon.get("/ui/datasets")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    bad = anon.post("/ui/login", data={"api_key": "dk_not-a-key"})
    assert bad.status_code == 401 and "not valid" in bad.text

    c = sign_in(api_url, tenant_key[1])
    cookie = c.cookies.jar._cookies["127.0.0.1"]["/ui"]["distillery_ui"]  # scoped to /ui
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.expires is None
    assert cookie.get_nonstandard_attr("SameSite").lower() == "strict"
    # The cookie opens the console only: the API keeps its bearer keys.
    assert (
        httpx.get(f"{api_url}/v1/jobs", cookies={"distillery_ui": cookie.value}).status_code == 401
    )

    rows = [{**ALPACA_ROWS[0], "instruction": XSS}, ALPACA_ROWS[1]]
    ds = api.post("/v1/datasets", files={"file": ("x.jsonl", "".join(json.dumps(r) + "\n" for r in rows))}).json()["id"]  # fmt: skip
    page = c.get(f"/ui/datasets/{ds}")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert XSS not in page.text and "&lt;img src=x onerror=" in page.text
    assert re.search(r"<script>(?!</script>)", page.text) is None  # no inline script at all

    # Forms need the session's CSRF token; another tenant's ids are not found.
    assert c.post("/ui/jobs", data={"type": "distill", "dataset": ds}).status_code == 403
    from api.keys import create_key, revoke_key

    other_key = create_key(redis_conn, "other-tenant")
    other = sign_in(api_url, other_key)
    assert other.get(f"/ui/datasets/{ds}").status_code == 404
    revoke_key(redis_conn, other_key)  # a revoked key ends its sessions
    assert other.get("/ui").status_code == 303

    form = c.get("/ui/new").text
    r = c.post("/ui/jobs", data={"csrf": csrf_of(form), "type": "distill", "dataset": ds,
                                 "max_new_tokens": "0"})  # fmt: skip
    assert r.status_code == 422 and "max_new_tokens" in r.text


def test_a_pipeline_page_shows_its_steps_and_cancels(api, api_url, tenant_key, tiny_model):
    """A pipeline started from the form: its page draws every step with its state, and
    the page's cancel button cancels it (all steps)."""
    ds = api.post("/v1/datasets", files={"file": ("a.jsonl", "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))}).json()["id"]  # fmt: skip
    c = sign_in(api_url, tenant_key[1])
    r = c.post("/ui/jobs", data={"csrf": csrf_of(c.get("/ui/new").text), "type": "pipeline",
                                 "dataset": ds, "model": tiny_model,
                                 "options": '{"blocks": 2, "tasks": ["arith"]}'})  # fmt: skip
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    page = c.get(r.headers["location"]).text
    steps = [c["step"] for c in api.get(f"/v1/jobs/{job_id}").json()["children"]]
    assert len(steps) >= 4 and page.count('<li class="step ') == len(steps)
    for step in steps:
        assert f"<b>{step}</b>" in page
    r = c.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf_of(page), "next": "/ui"})
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    done = api.get(f"/v1/jobs/{job_id}").json()
    assert done["cancel_requested"] or done["status"] == "cancelled"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium(),
            # No internet, as on a cluster: every host but the API's fails to resolve.
            args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        yield b
        b.close()


@pytest.mark.slow
def test_console_in_a_browser(browser, api, api_url, tenant_key, tiny_model, workers, tmp_path):
    from playwright.sync_api import expect

    ctx = browser.new_context(base_url=api_url, accept_downloads=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(f"{m.text} {m.location}"))

    page.goto("/ui")
    expect(page).to_have_url(f"{api_url}/ui/login")
    page.fill("input[name=api_key]", tenant_key[1])
    page.click("button:text('Sign in')")
    expect(page.locator("h1")).to_have_text("Jobs")

    # Upload (a row carries markup: it must show as text).
    small = tmp_path / "small.jsonl"
    rows = [{**r, "instruction": f"{r['instruction']} #{k}"} for k, r in enumerate(ALPACA_ROWS * 2)]
    rows[3]["instruction"] = XSS
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.goto("/ui/new")
    page.set_input_files("#upload input[name=file]", str(small))
    page.fill("#upload input[name=name]", "small")
    page.click("#upload button")
    expect(page.locator("h1")).to_contain_text("Dataset ds_")
    expect(page.locator("tr[data-row='3'] td.text").first).to_have_text(XSS)
    assert page.evaluate("window.__xss") is None and page.locator("table.rows img").count() == 0
    small_id = page.url.rsplit("/", 1)[1]

    # Start a short distill job from the form; its page follows it to the end.
    page.goto("/ui/new")
    page.select_option("#start select[name=type]", "distill")
    page.select_option("#start select[name=dataset]", small_id)
    page.fill("#start input[name=model]", tiny_model)
    page.fill("#start input[name=max_new_tokens]", "8")
    page.click("#start button")
    expect(page.locator("h1")).to_contain_text("distill job")
    short_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(f"[data-status='{short_id}']").first).to_have_text(
        "succeeded", timeout=180_000
    )
    expect(page.locator("progress").first).to_have_attribute("value", "16")
    expect(page.locator("[data-follow]")).to_have_count(0)  # a finished job: no stream

    # A long one: the jobs table's bar moves with no reload, then it is cancelled.
    long_rows = [{**r, "instruction": f"{r['instruction']} ({k})"} for k, r in enumerate(ALPACA_ROWS * 40)]  # fmt: skip
    long_ds = api.post("/v1/datasets", files={"file": ("long.jsonl", "".join(json.dumps(r) + "\n" for r in long_rows))}).json()["id"]  # fmt: skip
    page.goto("/ui/new")
    page.select_option("#start select[name=dataset]", long_ds)
    page.fill("#start input[name=model]", tiny_model)
    page.fill("#start input[name=max_new_tokens]", "64")
    page.fill("#start textarea[name=options]", '{"cache": false}')
    page.click("#start button")
    long_id = page.url.rsplit("/", 1)[1]
    page.goto("/ui")
    page.evaluate("window.__same_page = true")
    bar = page.locator(f"progress[data-bar='{long_id}']")
    start = int(bar.get_attribute("value") or 0)
    moved = wait_for(lambda: int(bar.get_attribute("value") or 0) > start, 180, 0.2,
                     "the long job's progress bar to move")  # fmt: skip
    assert moved
    assert page.evaluate("window.__same_page") is True  # moved live (SSE), not by reloading
    expect(page.locator(f"[data-label='{long_id}']")).to_contain_text("/320")
    page.locator(f"form[data-cancel='{long_id}'] button").click()
    expect(page.locator(f"[data-status='{long_id}']")).to_have_text("cancelled", timeout=60_000)
    done = api.get(f"/v1/jobs/{long_id}").json()
    assert done["status"] == "cancelled" and done["progress"]["rows_done"] < 320

    # The viewer: the distilled rows, filtered to one rejected reason.
    distilled = api.get(f"/v1/jobs/{short_id}").json()["artifacts"]["dataset"]
    stats = api.get(f"/v1/datasets/{distilled}/stats").json()["reasons"]
    page.goto(f"/ui/datasets/{distilled}")
    expect(page.locator("table.rows tbody tr")).to_have_count(16)
    rejected = sorted((r for r in stats if r != "ok"), key=lambda r: -stats[r])
    assert rejected, stats  # a random tiny teacher's 8-token rewrites are cut short
    page.click(f"nav.reasons a[data-reason='{rejected[0]}']")
    expect(page.locator("#range")).to_contain_text(
        f"of {stats[rejected[0]]} with reason {rejected[0]}"
    )
    shown = page.locator("table.rows tbody tr td:last-child").all_text_contents()
    assert len(shown) == stats[rejected[0]] and {s.strip() for s in shown} == {rejected[0]}

    # A model's file, downloaded through the session.
    page.goto(f"/ui/models/{tiny_model}")
    with page.expect_download() as dl:
        page.click("a[data-file='config.json']")
    got = tmp_path / "config.json"
    dl.value.save_as(got)
    want = api.get(f"/v1/models/{tiny_model}/files").json()["data"]
    sha = {f["name"]: f["sha256"] for f in want}["config.json"]
    assert hashlib.sha256(got.read_bytes()).hexdigest() == sha

    assert not errors, errors  # no script error, no CSP violation
    ctx.close()
