"""The Python client asks a read again when the service is briefly away (a piece
restarting, a machine under load), and never repeats a write."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from api.client import ApiError, Client


class Flaky(BaseHTTPRequestHandler):
    """503 for the first two requests of each method, then 200."""

    seen: dict[str, int] = {}

    def answer(self) -> None:
        n = self.seen[self.command] = self.seen.get(self.command, 0) + 1
        code, body = (503, b'{"error": {"code": "unavailable", "message": "busy"}}')
        if n > 2:
            code, body = 200, b'{"ok": true}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def flaky():
    Flaky.seen = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_read_is_asked_again_and_a_write_is_not(flaky, monkeypatch):
    monkeypatch.setattr(Client, "RETRY_WAITS", (0.01, 0.01, 0.01))
    with Client(flaky, api_key="k") as client:
        assert client._call("GET", "/v1/anything").json() == {"ok": True}
        assert Flaky.seen["GET"] == 3
        with pytest.raises(ApiError) as err:
            client._call("POST", "/v1/jobs", json={})
        assert err.value.status == 503 and Flaky.seen["POST"] == 1


def test_an_absent_service_is_reported_after_the_retries(monkeypatch):
    import httpx

    from api.redis_server import free_port

    monkeypatch.setattr(Client, "RETRY_WAITS", (0.01, 0.01))
    with Client(f"http://127.0.0.1:{free_port()}", api_key="k") as client:
        with pytest.raises(httpx.ConnectError):
            client._call("GET", "/v1/jobs")
