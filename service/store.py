"""The artifact store: datasets, models and run outputs, named by id, each with a JSON
manifest (kind, sha256, rows, parent ids, tenant).

Layout under ``DISTILLERY_HOME`` (a local disk or any shared filesystem path)::

    artifacts/<kind>/<id>/manifest.json   + the artifact's files
    builtin/<name>/                       converted builtin models

Artifacts are written under a temporary name and renamed when complete, so a reader
never sees half an artifact and a crash leaves only a ``.tmp-*`` folder to sweep.

**Object-store mode** (``DISTILLERY_STORE_URL=s3://bucket/prefix``): the same layout
lives under the URL (any fsspec filesystem; ``s3://`` needs the ``s3`` extra, s3fs), and
``DISTILLERY_HOME`` becomes this machine's cache. Artifacts are finished directories, so
the store moves whole directories: ``create`` builds one locally, then uploads its files
and the manifest *last* (an object store has no directory rename; the manifest's
presence is what marks an artifact complete, so a reader never sees half of one);
``path`` returns a local directory (transformers needs local files), downloading the
artifact into the cache unless the cached copy carries the same manifest, and checking
every file's sha256 against it.

**Serving one file** (a model download over HTTP, a page of a dataset): ``files`` lists
an artifact's files from its manifest (name, size, sha256) and ``read_range`` streams a
byte range of one of them, named as the manifest names it (a name is looked up, never
joined into a path). In object-store mode the bytes come with ranged reads of that one
object, so nothing is downloaded or checked whole before the first byte is served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from service.errors import DistilleryError
from service.once import made_once, publish

log = logging.getLogger(__name__)

KINDS = ("dataset", "model", "run")
PREFIX = {"dataset": "ds", "model": "mdl", "run": "run"}
_ID_RE = re.compile(r"^(ds|mdl|run)_[0-9a-f]{16,32}$")
MANIFEST = "manifest.json"


class NotFound(DistilleryError):
    code = "not_found"


class StoreError(DistilleryError):
    code = "store_error"


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
    def __init__(
        self,
        root: str | Path,
        remote: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        """``root``: the store (local mode) or this machine's cache of ``remote``, an
        fsspec URL such as ``s3://bucket/prefix`` (object-store mode)."""
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.remote = remote.rstrip("/") if remote else None
        self.fs: Any = None
        if self.remote:
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.remote, **(storage_options or {}))
            self.base = self.base.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Any = None, home: Path | None = None) -> ArtifactStore:
        if settings is None:
            from service.settings import get_settings

            settings = get_settings()
        return cls(
            home or settings.home_dir(),
            remote=settings.store_url,
            storage_options=settings.store_options,
        )

    # -- paths -----------------------------------------------------------------------
    def kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        d = self.root / "artifacts" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _check_id(self, kind: str, artifact_id: str) -> None:
        if not is_artifact_id(artifact_id) or not artifact_id.startswith(PREFIX[kind] + "_"):
            raise NotFound(f"no {kind} {artifact_id!r}")

    def _remote_dir(self, kind: str, artifact_id: str = "") -> str:
        return "/".join(p for p in (self.base, "artifacts", kind, artifact_id) if p)

    def path(self, kind: str, artifact_id: str) -> Path:
        """Folder of an existing artifact; NotFound for an unknown or malformed id."""
        self._check_id(kind, artifact_id)
        p = self.kind_dir(kind) / artifact_id
        if self.remote:
            manifest = self._remote_manifest(kind, artifact_id)

            def cached(q: Path) -> bool:
                return (q / MANIFEST).is_file() and (q / MANIFEST).read_bytes() == manifest

            # Workers of one machine share its cache: one downloads, the others wait.
            with made_once(p, done=cached) as todo:
                if todo:
                    self._fetch(kind, artifact_id, manifest)
            return p
        if not (p / MANIFEST).is_file():
            raise NotFound(f"no {kind} {artifact_id!r}")
        return p

    # -- writing ---------------------------------------------------------------------
    @contextmanager
    def create(self, kind: str, artifact_id: str | None = None, **manifest: Any) -> Iterator[Path]:
        """Yield a temporary folder; on success write the manifest and rename it into place
        (and, in object-store mode, upload it).

        The manifest gets ``id``, ``kind``, ``created_at`` and a sha256 of every file.
        """
        artifact_id = artifact_id or new_id(kind)
        final = self.kind_dir(kind) / artifact_id
        tmp = self.kind_dir(kind) / f".tmp-{artifact_id}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            paths = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
            files = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in paths}
            sizes = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in paths}
            doc = {"id": artifact_id, "kind": kind, "created_at": time.time(), "files": files}
            doc["sizes"] = sizes
            doc.update(manifest)
            (tmp / MANIFEST).write_text(json.dumps(doc, indent=2, default=str))
            if self.remote:
                self._upload(tmp, kind, artifact_id)
            # An artifact is immutable by id: a retried job that made it again keeps the
            # first complete copy, which a reader may already hold.
            publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- reading ---------------------------------------------------------------------
    # A damaged manifest fails the reads of its own artifact (``manifest``), never a
    # listing: one tenant's broken file must not make every tenant's list answer 500.
    def manifest(self, kind: str, artifact_id: str) -> dict:
        if self.remote:
            self._check_id(kind, artifact_id)
            return json.loads(self._remote_manifest(kind, artifact_id))
        return json.loads((self.path(kind, artifact_id) / MANIFEST).read_text())

    def list(self, kind: str, tenant: str | None = None) -> list[dict]:
        out = []
        for doc in self._remote_manifests(kind) if self.remote else self._local_manifests(kind):
            if tenant is None or doc.get("tenant") == tenant:
                out.append(doc)
        return sorted(out, key=lambda d: (d.get("created_at", 0), d["id"]))

    def _local_manifests(self, kind: str) -> Iterator[dict]:
        for d in self.kind_dir(kind).iterdir():
            m = d / MANIFEST
            if d.name.startswith(".") or not m.is_file():
                continue
            doc = _parse_manifest(m.read_bytes(), str(m))
            if doc is not None:
                yield doc

    # -- one file at a time ------------------------------------------------------------
    def files(self, kind: str, artifact_id: str, under: str = "") -> list[dict]:
        """``[{name, size, sha256}]`` of the artifact's files below the folder ``under``
        (names relative to it), from the manifest. Manifests written before sizes were
        recorded get them from the file system."""
        doc = self.manifest(kind, artifact_id)
        prefix = f"{under.strip('/')}/" if under else ""
        sizes = doc.get("sizes") or {}
        out = []
        for name, sha in sorted((doc.get("files") or {}).items()):
            if not name.startswith(prefix):
                continue
            size = sizes.get(name)
            if size is None:
                size = self._size(kind, artifact_id, name)
            out.append({"name": name[len(prefix) :], "size": int(size), "sha256": sha})
        return out

    def _size(self, kind: str, artifact_id: str, name: str) -> int:
        if self.remote:
            return int(self.fs.size(f"{self._remote_dir(kind, artifact_id)}/{name}"))
        return (self.kind_dir(kind) / artifact_id / name).stat().st_size

    def open_file(self, kind: str, artifact_id: str, name: str) -> IO[bytes]:
        """One file of the artifact, opened for reading (seekable). ``name`` must be one
        of the manifest's names: it is looked up there, never joined into a path first.
        Remote files read with one ranged GET per ``read`` (no cache, no read-ahead), so
        a reader that seeks to byte N of a 16 GB object fetches only what it reads."""
        doc = self.manifest(kind, artifact_id)
        if name not in (doc.get("files") or {}):
            raise NotFound(f"{kind} {artifact_id} has no file {name!r}")
        if self.remote:
            path = f"{self._remote_dir(kind, artifact_id)}/{name}"
            return self.fs.open(path, "rb", cache_type="none")
        return (self.kind_dir(kind) / artifact_id / name).open("rb")

    def read_range(
        self,
        kind: str,
        artifact_id: str,
        name: str,
        start: int = 0,
        end: int | None = None,
        chunk: int = 4 << 20,
    ) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive; None: to the end) of one file, in
        chunks of at most ``chunk`` bytes. The file is opened before the first chunk is
        asked for, so an unknown name fails at the call, not mid-stream."""
        fh = self.open_file(kind, artifact_id, name)

        def chunks() -> Iterator[bytes]:
            with fh:
                fh.seek(start)
                left = None if end is None else end - start
                while left is None or left > 0:
                    data = fh.read(chunk if left is None else min(chunk, left))
                    if not data:
                        return
                    if left is not None:
                        left -= len(data)
                    yield data

        return chunks()

    def delete(self, kind: str, artifact_id: str) -> None:
        if self.remote:
            self._check_id(kind, artifact_id)
            self._remote_manifest(kind, artifact_id)  # NotFound when missing
            remote = self._remote_dir(kind, artifact_id)
            self.fs.rm(f"{remote}/{MANIFEST}")  # first: from here on it does not exist
            self.fs.rm(remote, recursive=True)
            self.fs.invalidate_cache(remote)
            shutil.rmtree(self.kind_dir(kind) / artifact_id, ignore_errors=True)
            return
        shutil.rmtree(self.path(kind, artifact_id))

    # -- object-store mode -------------------------------------------------------------
    def lineage(self, model_id: str, depth: int = 20) -> list[dict]:
        """The model's ancestry, nearest first: each step's id, op, job and parents."""
        out: list[dict] = []
        frontier = [model_id]
        seen: set[str] = set()
        while frontier and len(out) < depth:
            ref = frontier.pop(0)
            if ref in seen:
                continue
            seen.add(ref)
            kind = {"mdl": "model", "ds": "dataset"}.get(ref.split("_", 1)[0])
            if kind is None or not is_artifact_id(ref):
                out.append({"ref": ref, "kind": "external"})
                continue
            try:
                m = self.manifest(kind, ref)
            except NotFound:
                out.append({"ref": ref, "kind": kind, "missing": True})
                continue
            parents = m.get("parents") or []
            out.append(
                {
                    "ref": ref,
                    "kind": kind,
                    "op": m.get("op"),
                    "job_id": m.get("job_id"),
                    "parents": parents,
                }  # fmt: skip
            )
            if kind == "model":
                frontier.extend(parents)
        return out

    def _remote_manifest(self, kind: str, artifact_id: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self._remote_dir(kind, artifact_id)}/{MANIFEST}")
        except FileNotFoundError:
            raise NotFound(f"no {kind} {artifact_id!r}") from None

    def _remote_manifests(self, kind: str) -> Iterator[dict]:
        root = self._remote_dir(kind)
        # s3fs caches listings per process; another machine may have written since.
        self.fs.invalidate_cache(root)
        paths = [
            p
            for p in self.fs.glob(f"{root}/*/{MANIFEST}")
            if not p.rstrip("/").split("/")[-2].startswith(".")
        ]
        for path, raw in (self.fs.cat(paths, on_error="omit") if paths else {}).items():
            doc = _parse_manifest(raw, path)
            if doc is not None:
                yield doc

    def _upload(self, folder: Path, kind: str, artifact_id: str) -> None:
        """Replace the remote artifact by ``folder``: files first, manifest last."""
        remote = self._remote_dir(kind, artifact_id)
        self.fs.invalidate_cache(remote)
        if self.fs.exists(remote):  # a retried job registers its output again
            try:
                self.fs.rm(f"{remote}/{MANIFEST}")
            except FileNotFoundError:
                pass
            self.fs.rm(remote, recursive=True)
        files = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST]
        if files:
            self.fs.put(
                [str(f) for f in files],
                [f"{remote}/{f.relative_to(folder).as_posix()}" for f in files],
            )
        self.fs.put_file(str(folder / MANIFEST), f"{remote}/{MANIFEST}")
        self.fs.invalidate_cache(remote)

    def _fetch(self, kind: str, artifact_id: str, manifest: bytes) -> None:
        """Download the artifact into the cache, check it, and rename it into place."""
        remote = self._remote_dir(kind, artifact_id)
        doc = json.loads(manifest)
        kdir = self.kind_dir(kind)
        tmp = kdir / f".tmp-fetch-{artifact_id}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        try:
            names = sorted(doc.get("files", {}))
            if names:
                self.fs.get([f"{remote}/{n}" for n in names], [str(tmp / n) for n in names])
            for name in names:
                if sha256_file(tmp / name) != doc["files"][name]:
                    raise StoreError(
                        f"{kind} {artifact_id}: {name} does not match its manifest's sha256"
                    )
            (tmp / MANIFEST).write_bytes(manifest)
            final = kdir / artifact_id
            if final.exists():  # a stale or partial copy (held under the lock: no reader)
                stale = kdir / f".stale-{artifact_id}-{uuid.uuid4().hex[:6]}"
                final.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def get_store() -> ArtifactStore:
    return ArtifactStore.from_settings()


def _parse_manifest(raw: bytes, where: str) -> dict | None:
    """A listed manifest, or None (logged) when it is not a JSON object."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        log.warning("skipping a damaged manifest %s: %s", where, exc)
        return None
    if not isinstance(doc, dict) or "id" not in doc:
        log.warning("skipping a manifest without an id: %s", where)
        return None
    return doc
