"""The service commands of ``distillery``: they talk to a running service over HTTP
(``--url``, ``--api-key``, or DISTILLERY_URL / DISTILLERY_API_KEY; by default the local
``distillery up`` and its key), except ``keys``, which writes to Redis directly.

    distillery up
    distillery datasets upload rows.jsonl
    distillery jobs submit distill --dataset ds_... --max-new-tokens 64 --watch
    distillery jobs list --status running
    distillery jobs watch job_...
    distillery keys create --tenant acme
    distillery keys create --admin
    distillery keys revoke dk_...
    distillery models import ./my-model/ --tenant acme
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.specs import JOB_SPECS


def _print(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    print(json.dumps(obj, indent=2, default=str))


def _client(args: argparse.Namespace):
    from api.client import Client

    return Client(args.url, args.api_key)


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="Service URL (default: DISTILLERY_URL or http://127.0.0.1:8000).")
    p.add_argument(
        "--api-key",
        help="API key (default: DISTILLERY_API_KEY, or the key `distillery up` created).",
    )


def _fmt_progress(progress: dict) -> str:
    done = progress.get("rows_done", progress.get("step"))
    total = progress.get("rows_total", progress.get("steps_total"))
    parts = [f"{done}/{total}"] if done is not None else []
    for k in ("loss", "tokens_per_s"):
        if progress.get(k) is not None:
            v = progress[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def watch(client, job_id: str, out=sys.stderr) -> int:
    """Follow a job's events until it ends; exit status 0 only if it succeeded."""
    for e in client.stream_events(job_id):
        if e.type == "progress":
            print(f"  progress {_fmt_progress(e.data)}", file=out, flush=True)
        elif e.type == "status":
            print(f"status {e.message}", file=out, flush=True)
        else:
            print(f"  {e.level}: {e.message}", file=out, flush=True)
    job = client.get_job(job_id)
    if job.error:
        print(f"error: {job.error.code}: {job.error.message} ({job.error.where})", file=out)
    return 0 if job.status == "succeeded" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "submit":
            spec = {
                k: getattr(args, k) for k in JOB_SPECS[args.type].model_fields if hasattr(args, k)
            }
            job = c.submit_job(args.type, idempotency_key=args.idempotency_key, **spec)
            _print(job)
            return watch(c, job.id) if args.watch else 0
        if args.action == "list":
            page = c.list_jobs(
                after=args.after, limit=args.limit, status=args.status, type=args.type
            )
            for j in page.data:
                print(f"{j.id}  {j.type:<9} {j.status:<10} {_fmt_progress(j.progress)}")
            if page.has_more:
                print(f"more: --after {page.next_cursor}")
            return 0
        if args.action == "get":
            _print(c.get_job(args.job_id))
            return 0
        if args.action == "watch":
            return watch(c, args.job_id)
        if args.action == "cancel":
            _print(c.cancel_job(args.job_id))
            return 0
        if args.action == "result":
            result = c.result(args.job_id)
            if isinstance(result, list):
                for row in result:
                    print(json.dumps(row, ensure_ascii=False))
            else:
                _print(result)
            return 0
    raise AssertionError(args.action)


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "upload":
            _print(c.upload_dataset(args.file, name=args.name))
        elif args.action == "get":
            _print(c.get_dataset(args.dataset_id))
        elif args.action == "list":
            for d in c.list_datasets(limit=args.limit).data:
                print(f"{d.id}  {d.rows:>7} rows  {d.name or ''}")
    return 0


def _redis_for(args: argparse.Namespace):
    import redis

    from service.settings import get_settings
    from workers.connect import configured_url

    url = args.redis_url or configured_url(get_settings().home_dir())
    if not url:
        print("error: no Redis: set REDIS_URL or start `distillery up`", file=sys.stderr)
        return None
    return redis.Redis.from_url(url)


def cmd_keys(args: argparse.Namespace) -> int:
    from api.keys import create_key, revoke_key

    conn = _redis_for(args)
    if conn is None:
        return 2
    if args.action == "revoke":
        if not revoke_key(conn, args.key):
            print("error: no such key", file=sys.stderr)
            return 1
        print("revoked", file=sys.stderr)
        return 0
    tenant = args.tenant or ("admin" if args.admin else None)
    if tenant is None:
        print("error: --tenant is required (or --admin)", file=sys.stderr)
        return 2
    try:
        key = create_key(conn, tenant, admin=args.admin)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(key)
    kind = "admin key" if args.admin else "key"
    print(f"({kind} of tenant {tenant}; the key is shown only now)", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``import``: bring a local model directory into a tenant's space in the store (API
    callers name models by id, never by a path on the server). ``download``: fetch a
    model's files from a running service, resuming partial files, hashes checked."""
    if args.action == "download":
        with _client(args) as c:
            folder = c.download_model(args.model_id, args.dir)
        print(folder)
        return 0
    from api.keys import TENANT_RE
    from service.errors import DistilleryError
    from service.models import import_model
    from service.store import ArtifactStore

    if not TENANT_RE.match(args.tenant):
        print(f"error: bad tenant {args.tenant!r}", file=sys.stderr)
        return 2
    try:
        manifest = import_model(
            ArtifactStore.from_settings(), args.tenant, args.path, name=args.name
        )
    except DistilleryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(manifest["id"])
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from api.up import up

    return up(args.host, args.port)


def cmd_api(args: argparse.Namespace) -> int:
    """The API alone (containers and multi-machine setups run workers separately)."""
    import uvicorn

    uvicorn.run(
        "api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.worker import run

    return run(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from service.cli import add_spec_options
    from workers.worker import add_arguments as worker_arguments

    p = sub.add_parser("up", help="Start Redis, the API and one teacher and one trainer worker.")
    p.add_argument("--host", default="127.0.0.1", help="Address the API listens on.")
    p.add_argument("--port", type=int, default=8000, help="Port the API listens on.")
    p.set_defaults(func=cmd_up, service=True)

    p = sub.add_parser("api", help="Run the API alone against REDIS_URL (no Redis, no workers).")
    p.add_argument("--host", default="127.0.0.1", help="Address the API listens on.")
    p.add_argument("--port", type=int, default=8000, help="Port the API listens on.")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes.")
    p.set_defaults(func=cmd_api, service=True)

    p = sub.add_parser("worker", help="Run a worker for the teacher or train queue.")
    worker_arguments(p)
    p.set_defaults(func=cmd_worker, service=True)

    jobs = sub.add_parser("jobs", help="Submit and follow jobs on a running service.")
    acts = jobs.add_subparsers(dest="action", required=True)
    submit = acts.add_parser("submit", help="Submit a job; options are the spec's fields.")
    types = submit.add_subparsers(dest="type", required=True)
    for name, spec_cls in JOB_SPECS.items():
        t = types.add_parser(name, help=(spec_cls.__doc__ or name).split("\n")[0])
        add_spec_options(t, spec_cls)
        t.add_argument("--idempotency-key", help="Same key and spec: the same job.")
        t.add_argument("--watch", action="store_true", help="Follow the job until it ends.")
        _client_options(t)
    lst = acts.add_parser("list", help="List jobs, newest first.")
    lst.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    lst.add_argument("--type", choices=list(JOB_SPECS))
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--after", help="Cursor from the previous page.")
    _client_options(lst)
    for action, help_text in (
        ("get", "A job as JSON."),
        ("watch", "Follow a job's events until it ends (exit 0 if it succeeded)."),
        ("cancel", "Cancel a job."),
        ("result", "A finished job's output (distilled rows as JSONL, else JSON)."),
    ):
        a = acts.add_parser(action, help=help_text)
        a.add_argument("job_id")
        _client_options(a)
    jobs.set_defaults(func=cmd_jobs, service=True)

    ds = sub.add_parser("datasets", help="Upload and inspect datasets on a running service.")
    acts = ds.add_subparsers(dest="action", required=True)
    up = acts.add_parser("upload", help="Upload a JSONL (or JSON array) file.")
    up.add_argument("file")
    up.add_argument("--name", help="A name to show (default: the file name).")
    get = acts.add_parser("get", help="A dataset's metadata.")
    get.add_argument("dataset_id")
    lst = acts.add_parser("list", help="List datasets, newest first.")
    lst.add_argument("--limit", type=int, default=20)
    for a in (up, get, lst):
        _client_options(a)
    ds.set_defaults(func=cmd_datasets, service=True)

    keys = sub.add_parser("keys", help="Manage API keys (writes to Redis).")
    acts = keys.add_subparsers(dest="action", required=True)
    create = acts.add_parser("create", help="Create a key for a tenant and print it once.")
    create.add_argument("--tenant", help="Tenant the key belongs to (default with --admin: admin).")
    create.add_argument(
        "--admin",
        action="store_true",
        help="An admin key: its list routes can show every tenant's items (?all=true).",
    )
    revoke = acts.add_parser("revoke", help="Revoke a key: it answers 401 from now on.")
    revoke.add_argument("key")
    for a in (create, revoke):
        a.add_argument("--redis-url", help="Redis (default: REDIS_URL or the `up` one).")
    keys.set_defaults(func=cmd_keys, service=True)

    models = sub.add_parser(
        "models", help="Import a model into the store, or download one from a service."
    )
    acts = models.add_subparsers(dest="action", required=True)
    imp = acts.add_parser(
        "import",
        help="Copy a local Hugging Face model directory into a tenant's space; prints its "
        "model id (mdl_...), the name API jobs use for it.",
    )
    imp.add_argument("path", help="Model directory (with config.json and weights).")
    imp.add_argument("--tenant", required=True, help="Tenant that will own the model.")
    imp.add_argument("--name", help="A name to show (default: the directory name).")
    dl = acts.add_parser(
        "download",
        help="Download a model's files from a running service into DIR (loads with "
        "from_pretrained); a partial download resumes; every file's sha256 is checked.",
    )
    dl.add_argument("model_id", help="The model id (mdl_...).")
    dl.add_argument("dir", help="Folder to write the model into (created if missing).")
    _client_options(dl)
    models.set_defaults(func=cmd_models, service=True)
