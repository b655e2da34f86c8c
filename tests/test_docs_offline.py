"""The API reference renders without internet: a real headless Chromium opens /docs of a
live API with every host but this one unresolvable, runs Swagger UI's JavaScript (served
by the API itself, from the fastapi-offline package) and lists the /v1/jobs routes.

    .venv/bin/python -m pytest tests/test_docs_offline.py -q

Needs Debian's ``chromium`` (``make test`` installs it when /usr/bin/chromium is missing).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import httpx
import pytest

pytest_plugins = ["tests.redis_fixture"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "no chromium on PATH: `make test` installs it (apt-get install chromium)"
    return exe


def rendered_dom(url: str, profile, budget_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran, with no network beyond 127.0.0.1."""
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}",
        # No internet: every host name but the API's fails to resolve (a CDN included).
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # chromium and its helper processes
            proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def test_docs_render_offline_and_list_the_job_routes(api_url, tmp_path):
    page = httpx.get(f"{api_url}/docs").text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)""", page)
    assert assets and all(a.startswith("/") for a in assets), assets  # none from a CDN
    for asset in assets:
        assert httpx.get(f"{api_url}{asset}").status_code == 200, asset

    dom = rendered_dom(f"{api_url}/docs", tmp_path / "profile")
    # The operations are drawn by Swagger UI from /openapi.json: the page as served has none.
    assert "/v1/jobs" not in page
    assert 'class="swagger-ui' in dom and "opblock" in dom, dom[:2000]
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= paths, paths

    redoc = httpx.get(f"{api_url}/redoc").text
    scripts = re.findall(r"""src=["']([^"']+)""", redoc)
    assert scripts and all(s.startswith("/") for s in scripts), scripts
    assert "fonts.googleapis" not in redoc
