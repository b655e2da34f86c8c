"""One file of an artifact over HTTP, with Range support (RFC 9110 §14): a 16 GB
checkpoint resumes after a dropped connection from the byte it reached.

    curl -H "Authorization: Bearer $KEY" -r 1048576- -o part \\
         http://127.0.0.1:8000/v1/models/mdl_.../files/model.safetensors

Ours rather than Starlette's ``FileResponse`` (which also answers ranges): the bytes must
come from the store, and in object-store mode that is an fsspec file read with ranged
GETs, not a path on this machine (``ArtifactStore.read_range``). One range per request
(``bytes=a-b``, ``bytes=a-``, ``bytes=-n``), what download managers and resuming clients
send; a multi-range request gets the whole file (allowed by the RFC).
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from service.store import ArtifactStore

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single byte range; None: send the whole file.
    ValueError: a range this file cannot satisfy (416)."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # a multi-range or malformed header: ignored, as the RFC allows
    first, last = m.group(1), m.group(2)
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            raise ValueError("empty suffix range")
        return max(size - n, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise ValueError(f"range starts at {start}, the file has {size} bytes")
    return start, end


def file_response(
    request: Request, store: ArtifactStore, kind: str, artifact_id: str, entry: dict, stored: str
) -> Response:
    """Stream ``stored`` (the manifest's name) of an artifact; ``entry`` is its row of
    ``ArtifactStore.files`` (name, size, sha256). The sha256 is the ETag: a client that
    resumes sends it in If-Range and gets the whole file if the artifact changed."""
    size, etag = entry["size"], f'"{entry["sha256"]}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{entry["name"].rsplit("/", 1)[-1]}"',
        "X-Checksum-Sha256": entry["sha256"],
    }
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range != etag:
        header = None  # the client's partial copy is of another version: send it all
    try:
        span = parse_range(header, size)
    except ValueError:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span or (0, size)
    status = 206 if span else 200
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    body = store.read_range(kind, artifact_id, stored, start, end)
    return StreamingResponse(
        body, status_code=status, media_type="application/octet-stream", headers=headers
    )
