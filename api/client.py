"""A small typed client of the Distillery API, on httpx, for scripts and other services.

    from api.client import Client
    with Client("http://127.0.0.1:8000", api_key="dk_...") as c:
        ds = c.upload_dataset("rows.jsonl")
        job = c.submit_job("distill", dataset=ds.id, max_new_tokens=128)
        for event in c.stream_events(job.id):
            print(event.type, event.message, event.data)
        rows = c.result(job.id)
        c.download_model("mdl_...", "./recovered")   # loads with from_pretrained

The URL and key default to DISTILLERY_URL and DISTILLERY_API_KEY, else
http://127.0.0.1:8000 and the key ``distillery up`` wrote to $DISTILLERY_HOME/api_key.
Errors raise :class:`ApiError` with the API's code, message and details.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from api.schemas import (
    DatasetPublic,
    DatasetsPublic,
    DistillResponse,
    EventPublic,
    EventsPublic,
    JobPublic,
    JobsPublic,
    ModelFilePublic,
    ModelFilesPublic,
    ModelPublic,
    ModelsPublic,
    Readiness,
)

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


def local_api_key() -> str | None:
    """The key `distillery up` created for this machine, if readable."""
    home = Path(os.environ.get("DISTILLERY_HOME", "~/.distillery")).expanduser()
    f = home / "api_key"
    try:
        return f.read_text().strip() or None
    except OSError:
        return None


class Client:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = (url or os.environ.get("DISTILLERY_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("DISTILLERY_API_KEY") or local_api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # A read that meets a timeout, a dropped connection or a 502/503/504 (a service
    # restarting a piece, a machine under load) is asked again after 1, 2 and 4 s; a write
    # is not (a POST may have landed: resubmit with an Idempotency-Key instead).
    RETRY_WAITS = (1.0, 2.0, 4.0)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        waits = list(self.RETRY_WAITS) if method in ("GET", "HEAD") else []
        while True:
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError:
                if not waits:
                    raise
                time.sleep(waits.pop(0))
                continue
            if r.status_code in (502, 503, 504) and waits:
                time.sleep(waits.pop(0))
                continue
            break
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": r.text[:500]}
            raise ApiError(r.status_code, err.get("code", ""), err.get("message", ""),
                           err.get("details"))  # fmt: skip
        return r

    # -- datasets ------------------------------------------------------------------
    def upload_dataset(self, source: str | Path | bytes, name: str | None = None) -> DatasetPublic:
        """Upload a JSONL (or JSON array) file, or raw JSONL bytes."""
        if isinstance(source, bytes):
            data, name = source, name or "upload.jsonl"
        else:
            data, name = Path(source).read_bytes(), name or Path(source).name
        r = self._call("POST", "/v1/datasets", files={"file": (name, data)})
        return DatasetPublic.model_validate(r.json())

    def get_dataset(self, dataset_id: str) -> DatasetPublic:
        return DatasetPublic.model_validate(self._call("GET", f"/v1/datasets/{dataset_id}").json())

    def list_datasets(self, after: str | None = None, limit: int = 20) -> DatasetsPublic:
        params = {k: v for k, v in {"after": after, "limit": limit}.items() if v is not None}
        return DatasetsPublic.model_validate(
            self._call("GET", "/v1/datasets", params=params).json()
        )

    def dataset_rows(self, dataset_id: str) -> list[dict]:
        r = self._call("GET", f"/v1/datasets/{dataset_id}/content")
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def delete_dataset(self, dataset_id: str) -> None:
        self._call("DELETE", f"/v1/datasets/{dataset_id}")

    # -- jobs ----------------------------------------------------------------------
    def submit_job(self, type: str, idempotency_key: str | None = None, **spec: Any) -> JobPublic:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self._call("POST", "/v1/jobs", json={"type": type, **spec}, headers=headers)
        return JobPublic.model_validate(r.json())

    def get_job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def list_jobs(
        self,
        after: str | None = None,
        limit: int = 20,
        status: str | None = None,
        type: str | None = None,
    ) -> JobsPublic:
        params = {"after": after, "limit": limit, "status": status, "type": type}
        params = {k: v for k, v in params.items() if v is not None}
        return JobsPublic.model_validate(self._call("GET", "/v1/jobs", params=params).json())

    def cancel_job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: str, after: str | None = None, limit: int = 100) -> EventsPublic:
        params = {k: v for k, v in {"after": after, "limit": limit}.items() if v is not None}
        r = self._call("GET", f"/v1/jobs/{job_id}/events", params=params)
        return EventsPublic.model_validate(r.json())

    def stream_events(self, job_id: str, after: str | None = None) -> Iterator[EventPublic]:
        """Server-Sent Events until the job ends; reconnects from the last event seen."""
        last = after
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            ended = False
            try:
                with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._call("GET", f"/v1/jobs/{job_id}")  # raises the API's error
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            event = EventPublic.model_validate(json.loads(line[6:]))
                            last = event.id
                            yield event
                            if event.type == "status" and event.message in TERMINAL:
                                ended = True
                    ended = True  # the server closes the stream once the job has ended
            except (httpx.ReadError, httpx.RemoteProtocolError):
                time.sleep(1.0)  # dropped connection: resume after `last`
            if ended:
                return

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> JobPublic:
        """Poll until the job ends (or ``timeout`` seconds pass); return the job."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            job = self.get_job(job_id)
            if job.status in TERMINAL or (deadline and time.monotonic() > deadline):
                return job
            time.sleep(poll)

    def result(self, job_id: str) -> list[dict] | dict:
        """A finished job's output: distilled rows (distill) or {metrics, artifacts}."""
        r = self._call("GET", f"/v1/jobs/{job_id}/result")
        if r.headers.get("content-type", "").startswith("application/x-ndjson"):
            return [json.loads(line) for line in r.text.splitlines() if line.strip()]
        return r.json()

    def distill(self, rows: list[dict], wait: float = 30.0, **options: Any) -> DistillResponse:
        r = self._call(
            "POST", "/v1/distill", params={"wait": wait}, json={"rows": rows, **options},
            timeout=wait + 30,
        )  # fmt: skip
        return DistillResponse.model_validate(r.json())

    # -- models and health ---------------------------------------------------------
    def list_models(self, after: str | None = None, limit: int = 20) -> ModelsPublic:
        params = {k: v for k, v in {"after": after, "limit": limit}.items() if v is not None}
        return ModelsPublic.model_validate(self._call("GET", "/v1/models", params=params).json())

    def get_model(self, model_id: str) -> ModelPublic:
        return ModelPublic.model_validate(self._call("GET", f"/v1/models/{model_id}").json())

    def model_files(self, model_id: str) -> list[ModelFilePublic]:
        r = self._call("GET", f"/v1/models/{model_id}/files")
        return ModelFilesPublic.model_validate(r.json()).data

    def download_model(self, model_id: str, dest: str | Path, retries: int = 8) -> Path:
        """Download every file of a model into ``dest`` (loads with ``from_pretrained``).

        Each file is written to ``NAME.part`` and renamed when its sha256 matches the
        server's manifest. A dropped connection resumes from the bytes already written
        (an HTTP Range request, If-Range on the file's sha256), up to ``retries`` times
        per file, and so does a later call after an interrupted one; files already
        complete are checked and kept."""
        from service.store import sha256_file

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for f in self.model_files(model_id):
            target = (dest / f.name).resolve()
            if not target.is_relative_to(root) or target == root:
                raise ApiError(502, "bad_file_name", f"the server named a file {f.name!r}")
            if target.is_file() and target.stat().st_size == f.size:
                if sha256_file(target) == f.sha256:
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            self._fetch_file(f"/v1/models/{model_id}/files/{f.name}", f, part, retries)
            if sha256_file(part) != f.sha256:
                part.unlink()
                raise ApiError(502, "checksum_mismatch",
                               f"{f.name}: the downloaded bytes do not match its sha256")  # fmt: skip
            part.replace(target)
        return dest

    def _fetch_file(self, path: str, f: ModelFilePublic, part: Path, retries: int) -> None:
        """Append the missing bytes of ``f`` to ``part``, resuming after dropped
        connections."""
        failures = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > f.size:
                part.unlink()
                have = 0
            if have == f.size:
                return
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{f.sha256}"'} if have else {}
            try:
                with self.http.stream("GET", path, headers=headers, timeout=None) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._call("GET", path)  # raises the API's error
                    mode = "ab" if r.status_code == 206 else "wb"  # 200: the whole file
                    with part.open(mode) as out:
                        for chunk in r.iter_bytes(1 << 20):
                            out.write(chunk)
            except httpx.TransportError:  # dropped, reset, timed out: resume from `have`
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(0.5 * failures, 5.0))

    def ready(self) -> Readiness:
        r = self.http.get("/readyz")
        return Readiness.model_validate(r.json())
