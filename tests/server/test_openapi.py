"""Schemathesis against ``/openapi.json`` of a live server: no input makes it answer 5xx.

The full app (streams, runs, UI) on every backend, ``MAX_EXAMPLES`` cases per
operation and generation mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.server.served import BACKENDS, Served, served

MAX_EXAMPLES = 8


@pytest.fixture(scope="module", params=BACKENDS)
def threaded_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server in its own thread and loop, so synchronous schemathesis calls can reach it."""
    srv: Served
    with served(request) as srv:
        for name in ("s1", "s2"):  # some streams that exist, so reads go past the 404
            requests.post(f"{srv.url}/v1/streams/{name}/events", json={"type": "x"}, timeout=10)
        yield srv.url


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_server_error(threaded_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{threaded_url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=threaded_url, timeout=15)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )
            elif response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and body["error"]["code"], response.text
                assert "Traceback" not in response.text

        try:
            run()
        except Unsatisfiable:
            # Operations without inputs (e.g. /healthz) have no negative cases to make.
            assert mode is GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures[:10])
