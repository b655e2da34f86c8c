"""Trust through the HTTP API (a real uvicorn and a real Redis; no workers needed):
admin and revoked keys, the `keys` and `models import` commands, limits (rows per
dataset, row size, unfinished jobs per tenant), references that never leave the
tenant's space, and hostile input, each answered by a clear 4xx error."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ALPACA_ROWS

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.integration

NDJSON = {"Content-Type": "application/x-ndjson"}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(api, rows) -> str:
    r = api.post("/v1/datasets", content=jsonl(rows), headers=NDJSON)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def error(r: httpx.Response, status: int) -> dict:
    """The JSON error body of a response that must have ``status``."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] and err["message"]
    return err


@pytest.fixture
def setting(monkeypatch):
    """Set DISTILLERY_<NAME> for the in-process API; restored after the test."""
    from service.settings import get_settings

    def set_(name: str, value) -> None:
        monkeypatch.setenv(f"DISTILLERY_{name.upper()}", str(value))
        get_settings.cache_clear()

    yield set_
    monkeypatch.undo()
    get_settings.cache_clear()


def client(api_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# -- keys --------------------------------------------------------------------------------


def test_admin_key_lists_every_tenant_and_others_cannot(api, api_url, redis_conn, tenant_key):
    from api.keys import create_key
    from workers import records

    mine = upload(api, ALPACA_ROWS[:2])
    job = records.create(redis_conn, tenant=tenant_key[0], type="prune", spec={}, queue="train")
    other_key = create_key(redis_conn, "other")
    with client(api_url, other_key) as other:
        theirs = upload(other, ALPACA_ROWS[:3])
        their_job = records.create(redis_conn, tenant="other", type="merge", spec={}, queue="train")
        # an ordinary key sees only its own, and may not ask for everything
        assert [d["id"] for d in other.get("/v1/datasets").json()["data"]] == [theirs]
        for route in ("/v1/datasets?all=true", "/v1/jobs?all=true", "/v1/models?all=true"):
            assert error(other.get(route), 403)["code"] == "forbidden"
        assert other.get(f"/v1/datasets/{mine}").status_code == 404

    with client(api_url, create_key(redis_conn, "ops", admin=True)) as admin:
        assert admin.get("/v1/datasets").json()["data"] == []  # its own tenant by default
        listed = admin.get("/v1/datasets?all=true").json()["data"]
        assert {(d["id"], d["tenant"]) for d in listed} >= {
            (mine, tenant_key[0]),
            (theirs, "other"),
        }
        jobs = admin.get("/v1/jobs?all=true").json()
        assert [(j["id"], j["tenant"]) for j in jobs["data"]] == [
            (their_job["id"], "other"),
            (job["id"], tenant_key[0]),
        ]  # newest first, across tenants
        page1 = admin.get("/v1/jobs?all=true&limit=1").json()
        assert page1["has_more"] and page1["data"][0]["id"] == their_job["id"]
        page2 = admin.get(f"/v1/jobs?all=true&limit=1&after={page1['next_cursor']}").json()
        assert [j["id"] for j in page2["data"]] == [job["id"]] and not page2["has_more"]
        assert admin.get("/v1/jobs?all=true&type=merge").json()["data"][0]["tenant"] == "other"
        assert admin.get("/v1/models?all=true").status_code == 200


def test_keys_commands_create_admin_and_revoke(api_url, redis_server, redis_conn, capsys):
    from api.cli import main
    from api.keys import lookup, tenant_for

    url = ["--redis-url", redis_server.url]
    assert main(["keys", "create", "--tenant", "acme", *url]) == 0
    key = capsys.readouterr().out.strip()
    assert tenant_for(redis_conn, key) == "acme" and not lookup(redis_conn, key)[1]
    assert main(["keys", "create", "--admin", *url]) == 0
    admin = capsys.readouterr().out.strip()
    assert tenant_for(redis_conn, admin) == "admin" and lookup(redis_conn, admin)[1]
    assert main(["keys", "create", "--tenant", "../x", *url]) == 2
    assert main(["keys", "create", *url]) == 2  # neither --tenant nor --admin
    capsys.readouterr()

    with client(api_url, admin) as c:
        assert c.get("/v1/jobs?all=true").status_code == 200
        assert main(["keys", "revoke", admin, *url]) == 0
        assert error(c.get("/v1/jobs"), 401)["code"] == "unauthorized"
    assert not lookup(redis_conn, admin)[1]
    assert main(["keys", "revoke", admin, *url]) == 1  # already gone
    with client(api_url, key) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert main(["keys", "revoke", key, *url]) == 0
        assert c.get("/v1/jobs").status_code == 401


def test_models_import_refuses_what_is_not_a_model(session_home, tiny_llama, tmp_path, capsys):
    from api.cli import main
    from service.store import ArtifactStore

    assert main(["models", "import", str(tiny_llama), "--tenant", "acme"]) == 0
    model_id = capsys.readouterr().out.strip()
    manifest = ArtifactStore(session_home).manifest("model", model_id)
    assert manifest["tenant"] == "acme" and manifest["info"]["num_hidden_layers"] == 6

    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_llama / "config.json").read_text())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    for bad, why in (
        (empty, "no config.json"),
        (no_weights, "no weights"),
        (garbage, "usable model config"),
        (tmp_path / "missing", "no config.json"),
    ):
        assert main(["models", "import", str(bad), "--tenant", "acme"]) == 2
        assert why in capsys.readouterr().err
    assert main(["models", "import", str(tiny_llama), "--tenant", "../up"]) == 2


# -- limits ------------------------------------------------------------------------------


def test_rows_per_dataset_and_row_size_are_limited(api, setting):
    setting("max_dataset_rows", 5)
    err = error(api.post("/v1/datasets", content=jsonl(ALPACA_ROWS[:6]), headers=NDJSON), 413)
    assert err["code"] == "too_large" and "MAX_DATASET_ROWS" in err["message"]
    assert err["details"] == {"rows": 6, "limit": 5}
    assert (
        api.post("/v1/datasets", content=jsonl(ALPACA_ROWS[:5]), headers=NDJSON).status_code == 201
    )
    # the same limit holds for POST /v1/distill, whose rows become a dataset
    r = api.post("/v1/distill?wait=0", json={"rows": ALPACA_ROWS[:6]})
    assert error(r, 413)["code"] == "too_large"

    setting("max_row_kb", 1)
    rows = [ALPACA_ROWS[0], {"instruction": "long", "output": "x" * 2000}]
    err = error(api.post("/v1/datasets", content=jsonl(rows), headers=NDJSON), 422)
    assert err["code"] == "invalid_dataset"
    assert [(d["line"], "MAX_ROW_KB" in d["message"]) for d in err["details"]] == [(2, True)]
    assert api.get("/v1/datasets").json()["data"][0]["rows"] == 5  # nothing else was saved


def test_unfinished_jobs_per_tenant_answer_429_with_retry_after(
    api, redis_conn, tenant_key, tiny_model, setting
):
    from workers import records

    setting("max_active_jobs", 2)
    setting("retry_after", 7)
    ds = upload(api, ALPACA_ROWS[:2])
    body = {"type": "distill", "teacher": tiny_model, "dataset": ds, "max_new_tokens": 4}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "one"})
    assert first.status_code == 202, first.text
    # a second unfinished job (a record only: no worker may finish it during the test)
    other = records.create(redis_conn, tenant=tenant_key[0], type="prune", spec={}, queue=None)

    r = api.post("/v1/jobs", json=body)
    err = error(r, 429)
    assert r.headers["Retry-After"] == "7" and err["code"] == "too_many_jobs"
    assert "MAX_ACTIVE_JOBS" in err["message"]
    r = api.post("/v1/distill?wait=0", json={"rows": ALPACA_ROWS[:1], "teacher": tiny_model})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    # a replay of an accepted submission is still answered with its job
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "one"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    # another tenant is not held back by this one's queue
    from api.keys import create_key

    with client(str(api.base_url), create_key(redis_conn, "roomy")) as c:
        ds2 = upload(c, ALPACA_ROWS[:1])
        r = c.post(
            "/v1/jobs", json={**body, "teacher": "builtin:smollm2-135m-instruct", "dataset": ds2}
        )
        assert r.status_code == 202, r.text

    # a finished job frees its place
    records.transition(redis_conn, other["id"], ("queued",), "cancelled")
    assert api.post("/v1/jobs", json=body).status_code == 202
    assert records.count_active(redis_conn, tenant_key[0]) == 2


# -- references stay in the tenant's space -------------------------------------------------


def test_api_references_are_ids_never_server_paths(api, tiny_llama, tiny_model, tmp_path):
    ds = upload(api, ALPACA_ROWS[:2])
    data_file = tmp_path / "rows.jsonl"
    data_file.write_bytes(jsonl(ALPACA_ROWS[:2]))
    bad_models = [
        str(tiny_llama),  # a real model directory on the server
        f"{tiny_llama}/../{tiny_llama.name}",
        "../../etc",
        "./model",
        "~/model",
        "~root/x",
        "models/../../etc",
        "org/../name",
        "mdl_../../etc",
        "C:\\models\\x",
        "a/b/c",
        "nul\x00/byte",
    ]
    for ref in bad_models:
        for body in (
            {"type": "distill", "teacher": ref, "dataset": ds},
            {"type": "prune", "model": ref, "calibration": ds, "blocks": 1},
            {"type": "finetune", "model": ref, "dataset": ds},
            {"type": "evaluate", "model": tiny_model, "baseline": ref},
            {"type": "merge", "models": [tiny_model, ref]},
            {"type": "pipeline", "model": ref, "dataset": ds},
        ):
            err = error(api.post("/v1/jobs", json=body), 422)
            assert err["code"] in ("invalid_spec", "invalid_request"), (ref, err)
    for ref in (str(data_file), "../" + ds, "ds_../../etc/passwd", "/etc/passwd", "rows.jsonl"):
        for body in (
            {"type": "distill", "teacher": tiny_model, "dataset": ref},
            {"type": "prune", "model": tiny_model, "calibration": ref, "blocks": 1},
        ):
            err = error(api.post("/v1/jobs", json=body), 422)
            assert "dataset id" in err["message"], err
    err = error(api.post("/v1/distill", json={"rows": ALPACA_ROWS[:1], "teacher": "/tmp"}), 422)
    assert "paths on the server" in err["message"]
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was queued

    # what is accepted: ids of the caller's own, builtins, hub ids
    for teacher in (tiny_model, "builtin:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M"):
        r = api.post("/v1/jobs", json={"type": "distill", "teacher": teacher, "dataset": ds})
        assert r.status_code == 202, r.text
    # a hub id is queued as hf:org/name, which a worker never reads as a local folder
    assert r.json()["spec"]["teacher"] == "hf:HuggingFaceTB/SmolLM2-135M"


def test_a_hub_id_never_loads_a_folder_of_the_same_name(tmp_path, monkeypatch, tiny_llama):
    import shutil

    from service.errors import ModelError
    from service.models import resolve_model

    shutil.copytree(tiny_llama, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = resolve_model("org/name", home=tmp_path / "home")  # the CLI's local path
    assert local.resolve() == tmp_path / "org" / "name"
    with pytest.raises(ModelError, match="cannot fetch hub model 'org/name'"):
        resolve_model("hf:org/name", home=tmp_path / "home")


def test_unknown_models_and_blocks_beyond_the_depth(api, api_url, redis_conn, tiny_model):
    from api.keys import create_key

    ds = upload(api, ALPACA_ROWS[:2])
    err = error(
        api.post("/v1/jobs", json={"type": "distill", "teacher": "builtin:nope", "dataset": ds}),
        422,
    )
    assert "unknown builtin" in err["message"]
    unknown = "mdl_" + "0" * 20
    r = api.post("/v1/jobs", json={"type": "finetune", "model": unknown, "dataset": ds})
    assert error(r, 404)["code"] == "not_found"
    with client(api_url, create_key(redis_conn, "stranger")) as c:
        ds2 = upload(c, ALPACA_ROWS[:2])
        r = c.post("/v1/jobs", json={"type": "finetune", "model": tiny_model, "dataset": ds2})
        assert error(r, 404)["message"] == error(
            c.post("/v1/jobs", json={"type": "finetune", "model": unknown, "dataset": ds2}), 404
        )["message"].replace(unknown, tiny_model)  # the same answer as a missing id

    for blocks in (6, 7, 1024):  # the tiny model has 6 blocks
        for body in (
            {"type": "prune", "model": tiny_model, "calibration": ds, "blocks": blocks},
            {"type": "pipeline", "model": tiny_model, "dataset": ds, "blocks": blocks},
        ):
            err = error(api.post("/v1/jobs", json=body), 422)
            assert err["details"]["num_hidden_layers"] == 6 and "between 1 and 5" in err["message"]
    for blocks in (0, -1, 1025):
        r = api.post(
            "/v1/jobs",
            json={"type": "prune", "model": tiny_model, "calibration": ds, "blocks": blocks},
        )
        assert error(r, 422)["details"][0]["field"].endswith("blocks")
    r = api.post(
        "/v1/jobs", json={"type": "prune", "model": tiny_model, "calibration": ds, "blocks": 5}
    )
    assert r.status_code == 202, r.text


# -- hostile input -----------------------------------------------------------------------

BAD_DATASETS = [
    (b"", "holds no rows"),
    (b"\n \n", "holds no rows"),
    (b'{"instruction": "\xff\xfe", "output": "x"}\n', "UTF-8"),
    (b"\x00\x01\x02garbage\n", "invalid JSON"),
    (b"{not json\n", "invalid JSON"),
    (b"[1, 2, 3]", "must be a JSON object"),
    (b"3\n", "must be a JSON object"),
    (b'"a string"\n', "must be a JSON object"),
    (b"null\n", "must be a JSON object"),
    (b'{"instruction": 3, "output": "x"}\n', "must be a string"),
    (b'{"instruction": "x"}\n', "missing field"),
    (b'{"unknown": "shape"}\n', ""),
    (b"x" * (10 << 20), "invalid JSON"),  # a 10 MB single line, no newline
    (b'{"instruction": "x", "output": "' + b"y" * (10 << 20) + b'"}\n', "MAX_ROW_KB"),
]


@pytest.mark.parametrize("body,why", BAD_DATASETS, ids=range(len(BAD_DATASETS)))
def test_hostile_datasets_get_422(api, body, why):
    err = error(api.post("/v1/datasets", content=body, headers=NDJSON), 422)
    assert err["code"] == "invalid_dataset" and why in json.dumps(err)
    r = api.post("/v1/datasets", files={"file": ("x.jsonl", body)})
    assert r.status_code == 422
    assert api.get("/v1/datasets").json()["data"] == []


def test_names_with_dot_dot_stay_names(api, session_home):
    before = {p.name for p in session_home.iterdir()}
    r = api.post(
        "/v1/datasets?name=../../../escape.jsonl", content=jsonl(ALPACA_ROWS[:1]), headers=NDJSON
    )
    assert r.status_code == 201 and r.json()["name"] == "../../../escape.jsonl"
    r = api.post("/v1/datasets", files={"file": ("../../escape2.jsonl", jsonl(ALPACA_ROWS[:1]))})
    assert r.status_code == 201
    assert {p.name for p in session_home.iterdir()} == before  # nothing written beside the store
    assert not list(session_home.parent.glob("escape*"))
    for path in (
        "/v1/datasets/..%2F..%2Fetc%2Fpasswd",
        "/v1/datasets/ds_..%2F..%2Fx/content",
        "/v1/datasets/%2e%2e",
        "/v1/jobs/..%2F..%2Fetc",
        "/v1/jobs/job_%00/events",
        "/v1/models/..",
        "/v1/models/mdl_..%2F..",
    ):
        assert api.get(path).status_code == 404, path
    assert api.delete("/v1/datasets/..%2Fds").status_code == 404


GOOD = {"type": "finetune", "model": "builtin:smollm2-135m-instruct", "dataset": "ds_x"}
BAD_JOB_BODIES = [
    (b'{"type": "distill", "dataset": "\xff\xfe"}', 400),  # not UTF-8
    (b"{not json", 422),
    (b"", 422),
    (b"[]", 422),
    (b'"distill"', 422),
    (b"3", 422),
    (b"null", 422),
    (b'{"dataset": "ds_x"}', 422),  # no type
    (b'{"type": "explode"}', 422),
    (b'{"type": "distill"}', 422),  # no dataset
    (b'{"type": "distill", "dataset": 3}', 422),
    (b'{"type": "distill", "dataset": ["ds_x"]}', 422),
    (b'{"type": "distill", "dataset": "ds_x", "extra": 1}', 422),
    (b'{"type": "prune", "calibration": "ds_x", "blocks": "two"}', 422),
    (b'{"type": "evaluate", "model": "builtin:x", "tasks": "arc_easy"}', 422),
    (b'{"type": "evaluate", "model": "builtin:x", "tasks": ["nope"]}', 422),
    (b'{"type": "distill", "dataset": "ds_x", "temperature": NaN}', 422),
    (b'{"type": "distill", "dataset": "ds_x", "temperature": Infinity}', 422),
    (b'{"type": "distill", "dataset": "' + b"d" * 600 + b'"}', 422),
]
ABSURD = [
    ("lr", -1e-4), ("lr", 0), ("lr", 1e9), ("epochs", 0), ("epochs", -1), ("epochs", 1e6),
    ("batch_size", 0), ("batch_size", 10**9), ("micro_batch_size", -8), ("lora_rank", 0),
    ("lora_rank", 10**6), ("lora_alpha", -16), ("lora_dropout", 1.0), ("warmup_ratio", 2),
    ("max_length", 1), ("max_length", 10**9), ("seed", -1), ("seed", 2**70),
    ("limit", 0), ("limit", 10**12), ("checkpoint_every", 0), ("checkpoint_every", 10**12),
    ("target_modules", []), ("target_modules", ["../x"]), ("target_modules", ["q"] * 1000),
]  # fmt: skip
ABSURD_DISTILL = [
    ("max_new_tokens", 0), ("max_new_tokens", 10**7), ("batch_size", 0), ("batch_size", 10**6),
    ("temperature", -1), ("temperature", 1e6), ("top_p", 0), ("top_p", 2), ("seed", -5),
    ("limit", 0), ("engine", "rm -rf"), ("template", "../x"),
]  # fmt: skip


def test_hostile_job_bodies_get_clear_4xx(api):
    for body, status in BAD_JOB_BODIES:
        r = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        error(r, status)
    r = api.post("/v1/jobs", content=b"type=distill", headers={"Content-Type": "text/plain"})
    assert 400 <= r.status_code < 500
    for kind in ("text/plain", None):  # JSON sent without saying so: a message that says so
        headers = {"Content-Type": kind} if kind else {}
        r = api.post("/v1/jobs", content=json.dumps(GOOD).encode(), headers=headers)
        assert "sent as application/json" in error(r, 422)["message"], r.text
    for field, value in ABSURD:
        err = error(api.post("/v1/jobs", json={**GOOD, field: value}), 422)
        assert err["code"] == "invalid_request"
        assert any(d["field"].endswith(field) or field in d["field"] for d in err["details"]), (
            field, value, err,
        )  # fmt: skip
    for field, value in ABSURD_DISTILL:
        body = {"type": "distill", "dataset": "ds_x", field: value}
        assert error(api.post("/v1/jobs", json=body), 422)["code"] == "invalid_request", field
        r = api.post("/v1/distill", json={"rows": ALPACA_ROWS[:1], field: value})
        assert error(r, 422)["code"] == "invalid_request", field
    for params in ("wait=-1", "wait=1e9", "wait=abc"):
        assert api.post(f"/v1/distill?{params}", json={"rows": ALPACA_ROWS[:1]}).status_code == 422
    for rows in ([], [1], "rows", [{}]):
        assert 400 <= api.post("/v1/distill", json={"rows": rows}).status_code < 500
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was queued


def test_hostile_queries_and_headers(api):
    for path in (
        "/v1/jobs?limit=-1",
        "/v1/jobs?limit=100000",
        "/v1/jobs?status=../x",
        "/v1/jobs?all=maybe",
        "/v1/datasets?limit=abc",
        "/v1/jobs/job_x/events?after=../x",
        "/v1/jobs/job_x/report?format=../../etc",
        "/v1/jobs?after=../x",
        "/v1/jobs?after=garbage",  # as events' ?after=garbage
    ):
        assert error(api.get(path), 422)["code"] == "invalid_request", path
    assert api.get("/v1/jobs?after=job_" + "0" * 20).json()["data"] == []  # an unknown cursor
    r = api.post(
        "/v1/jobs",
        json={"type": "distill", "dataset": "ds_x"},
        headers={"Idempotency-Key": "k" * 300},
    )
    assert error(r, 422)["code"] == "invalid_request"
    for auth in (
        "Bearer",
        "Bearer  dk_",
        "Basic Zm9vOmJhcg==",
        "Bearer \u00e9t\u00e9",
        "Bearer " + "x" * 10_000,
    ):
        r = httpx.get(f"{api.base_url}/v1/jobs", headers={"Authorization": auth.encode("utf-8")})
        assert r.status_code in (401, 403), (auth[:20], r.status_code)


def test_the_admin_key_of_the_deployment_is_registered_on_start(redis_server, redis_conn, setting):
    """DISTILLERY_ADMIN_KEY (docker-compose requires it) becomes an admin key when the API
    starts; a short one stops the API."""
    from api.app import create_app
    from api.keys import lookup, tenant_for

    key = "dk_" + "a" * 40
    setting("admin_key", key)
    create_app(redis_server.url)
    assert tenant_for(redis_conn, key) == "admin" and lookup(redis_conn, key)[1]
    setting("admin_key", "short")
    with pytest.raises(RuntimeError, match="too short"):
        create_app(redis_server.url)
    assert tenant_for(redis_conn, "short") is None
