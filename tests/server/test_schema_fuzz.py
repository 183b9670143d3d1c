"""Schemathesis fuzzes every operation of the OpenAPI schema the server publishes (a bounded
run): whatever it sends, the server answers without a 5xx and keeps serving.

Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9."""
from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow


def test_no_server_errors(openapi_schema, small_context_server):
    base, _ = small_context_server
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    statuses: list[int] = []
    for op in operations:
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            response = case.call(base_url=base, timeout=120)
            statuses.append(response.status_code)
            assert response.status_code < 500, f"{op.method.upper()} {op.path}: {response.text[:500]}"

        check()
    assert len(statuses) >= 3 * len(operations) and 200 in statuses and 400 in statuses, sorted(set(statuses))
    assert httpx.get(f"{base}/health").status_code == 200
