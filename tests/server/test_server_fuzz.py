"""schemathesis against the server's own OpenAPI document (the app in-process over ASGI, tiny
models, no keys): seeded, bounded examples; any 5xx, any logged server error, any response that does
not match the documented schema, status code or content type fails."""

from __future__ import annotations

import logging

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="[required] schemathesis is not installed")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from schemathesis.generation import GenerationMode  # noqa: E402

from e5kit import E5  # noqa: E402
from e5kit.server import ServerConfig, create_app  # noqa: E402


def rejected(ctx, response, case):
    """schemathesis' negative_data_rejection, with 413 (too many inputs, documented) as a rejection too."""
    if response.status_code == 413:
        return True
    return negative_data_rejection(ctx, response, case)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          rejected]


@pytest.fixture(scope="module")
def models(tiny_bert, tiny_instruct):
    return [("tiny", E5(str(tiny_bert))), ("inst", E5(str(tiny_instruct)))]


@pytest.fixture
def fuzz_app(models, caplog):
    """A fresh app per test: schemathesis runs its lifespan and ends it with the test."""
    caplog.set_level(logging.ERROR)
    yield create_app(models, ServerConfig(max_inputs=64))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzz(fuzz_app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 9
    calls = []
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=20, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case):
            calls.append(case.call_and_validate(checks=CHECKS, timeout=30).status_code)

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
            assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET"
    statuses = set(calls)
    print(f"{mode}: {len(calls)} calls, statuses {sorted(statuses)}")
    assert len(calls) >= 5 * len(operations) and max(statuses) < 500
    assert (200 in statuses) if mode == GenerationMode.POSITIVE else (statuses & {400, 415, 422})
