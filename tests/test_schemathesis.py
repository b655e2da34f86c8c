"""Property-based requests generated from the app's own OpenAPI schema (schemathesis):
every operation, authenticated with a valid key, against a real uvicorn and a real Redis;
no request may answer 5xx. A database of its own with no workers listening, so the jobs
it submits stay queued and cost nothing."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

pytest_plugins = ["tests.redis_fixture"]
pytestmark = pytest.mark.integration

EXAMPLES = 50  # per operation and mode; about 20 operations: a minute or two on two cores


@pytest.fixture(scope="module")
def fuzz_target(redis_server):
    """(base URL, API key) of an API on Redis database 5, where no worker listens."""
    from api.app import create_app
    from api.keys import create_key
    from tests.redis_fixture import LiveServer, own_db

    url, conn = own_db(redis_server, 5)
    key = create_key(conn, "fuzz")
    with LiveServer(create_app(url)) as live:
        yield live.url, key
    conn.flushdb()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_answers_5xx(fuzz_target, mode):
    """Valid requests (positive) and requests that break the schema (negative), for
    every operation: each answer is below 500."""
    from schemathesis import GenerationMode

    base, key = fuzz_target
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    server_errors: list[str] = []
    skipped: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            if case.path == "/v1/distill" and isinstance(case.query, dict):
                case.query["wait"] = 0  # nothing runs the job: do not wait for it
            headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
            response = case.call(base_url=base, headers=headers, timeout=30)
            if case.path == "/readyz" and response.status_code == 503:
                return  # by design: no worker listens on this database
            if response.status_code >= 500:
                server_errors.append(
                    f"{case.method} {case.formatted_path} query={case.query} "
                    f"body={str(case.body)[:200]} -> {response.status_code}: {response.text[:300]}"
                )

        try:
            check()
        except Unsatisfiable:
            assert mode == "negative"  # an operation with nothing to get wrong (no inputs)
            skipped.append(operation.label)
    assert server_errors == []
    assert len(skipped) < len(operations) // 2
