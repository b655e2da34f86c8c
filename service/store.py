"""The artifact store: datasets, models and run outputs, named by id, each with a JSON
manifest (kind, sha256, rows, parent ids, tenant).

Layout under ``DISTILLERY_HOME`` (a local disk or any shared filesystem path)::

    artifacts/<kind>/<id>/manifest.json   + the artifact's files
    builtin/<name>/                       converted builtin models

Artifacts are written under a temporary name and renamed when complete, so a reader
never sees half an artifact and a crash leaves only a ``.tmp-*`` folder to sweep.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import DistilleryError

KINDS = ("dataset", "model", "run")
PREFIX = {"dataset": "ds", "model": "mdl", "run": "run"}
_ID_RE = re.compile(r"^(ds|mdl|run)_[0-9a-f]{16,32}$")


class NotFound(DistilleryError):
    code = "not_found"


def new_id(kind: str) -> str:
    return f"{PREFIX[kind]}_{uuid.uuid4().hex[:20]}"


def is_artifact_id(ref: str) -> bool:
    return bool(_ID_RE.match(ref))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- paths -----------------------------------------------------------------------
    def kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        d = self.root / "artifacts" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    def path(self, kind: str, artifact_id: str) -> Path:
        """Folder of an existing artifact; NotFound for an unknown or malformed id."""
        if not is_artifact_id(artifact_id) or not artifact_id.startswith(PREFIX[kind] + "_"):
            raise NotFound(f"no {kind} {artifact_id!r}")
        p = self.kind_dir(kind) / artifact_id
        if not (p / "manifest.json").is_file():
            raise NotFound(f"no {kind} {artifact_id!r}")
        return p

    # -- writing ---------------------------------------------------------------------
    @contextmanager
    def create(self, kind: str, artifact_id: str | None = None, **manifest: Any) -> Iterator[Path]:
        """Yield a temporary folder; on success write the manifest and rename it into place.

        The manifest gets ``id``, ``kind``, ``created_at`` and a sha256 of every file.
        """
        artifact_id = artifact_id or new_id(kind)
        final = self.kind_dir(kind) / artifact_id
        tmp = self.kind_dir(kind) / f".tmp-{artifact_id}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            files = {
                str(f.relative_to(tmp)): sha256_file(f)
                for f in sorted(tmp.rglob("*"))
                if f.is_file()
            }
            doc = {"id": artifact_id, "kind": kind, "created_at": time.time(), "files": files}
            doc.update(manifest)
            (tmp / "manifest.json").write_text(json.dumps(doc, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- reading ---------------------------------------------------------------------
    def manifest(self, kind: str, artifact_id: str) -> dict:
        return json.loads((self.path(kind, artifact_id) / "manifest.json").read_text())

    def list(self, kind: str, tenant: str | None = None) -> list[dict]:
        out = []
        for d in self.kind_dir(kind).iterdir():
            m = d / "manifest.json"
            if d.name.startswith(".") or not m.is_file():
                continue
            doc = json.loads(m.read_text())
            if tenant is None or doc.get("tenant") == tenant:
                out.append(doc)
        return sorted(out, key=lambda d: (d.get("created_at", 0), d["id"]))

    def delete(self, kind: str, artifact_id: str) -> None:
        shutil.rmtree(self.path(kind, artifact_id))


def get_store() -> ArtifactStore:
    from service.settings import get_settings

    return ArtifactStore(get_settings().home_dir())
