"""The gateway's OpenAPI document against the gateway: Schemathesis sends every operation
generated requests, valid and invalid, and checks each answer with all its checks (no server
error, statuses, headers, content types and bodies as documented, valid data accepted, invalid
data and missing keys refused).

The default run takes FUZZ_EXAMPLES (25) examples per operation; the full campaign is
`FUZZ_EXAMPLES=100 .venv/bin/pytest tests/integration/gateway/test_gateway_openapi.py`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema
from schemathesis.openapi.checks import RejectedPositiveData

from tests.integration.gateway.helpers import UNLIMITED_RATE, Gateway, start_gateway

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("openapi"),
        env=UNLIMITED_RATE,
    )
    yield gw
    gw.daemon.stop()


_keys = itertools.count()


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]
) -> None:
    """Valid requests made valid in what JSON Schema cannot say (in every phase, just before
    they are sent): each tensor's data holds its shape's product of values, and an
    Idempotency-Key is not reused for another body."""
    if case.operation.method.upper() != "POST" or case.meta is None:
        return
    if not case.meta.generation.mode.is_positive:
        return
    if isinstance(case.body, dict):
        for tensor in case.body.get("inputs", []):
            _fit_data_to_shape(tensor)
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = f"{case.headers['Idempotency-Key'][:200]}#{next(_keys)}"


@schemathesis.hook
def filter_failure(
    context: schemathesis.HookContext,
    failure: Any,
    case: schemathesis.Case,
    response: schemathesis.Response,
) -> bool:
    """Keep every failure but one kind: a valid request whose finite values drive the model to
    NaN or infinity (FP32 pixels of 3e38) is refused with 422 and says why, since JSON cannot
    carry the answer; which values do that depends on the model, not on any schema."""
    return not (
        response.status_code == 422
        and b"answered NaN or infinity" in response.content
        and isinstance(failure, RejectedPositiveData)
    )


def _fit_data_to_shape(tensor: dict[str, Any]) -> None:
    shape, data = tensor.get("shape"), tensor.get("data")
    if not (isinstance(shape, list) and isinstance(data, list) and shape and data):
        return
    per_item = math.prod(shape[1:])
    items = max(1, min(shape[0], len(data) // per_item))
    tensor["shape"] = [items, *shape[1:]]
    tensor["data"] = (data * math.ceil(items * per_item / len(data)))[: items * per_item]


def test_every_operation_answers_as_documented(fuzzed: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    schema.config.update(
        base_url=fuzzed.url, headers={"Authorization": f"Bearer {fuzzed.key}"}, request_timeout=30
    )
    schema.config.generation.update(max_examples=EXAMPLES, deterministic=True)
    # 413 is how the gateway refuses what is over its documented limits (items, values,
    # bytes): a refusal as right as a 400, which the check's default list leaves out.
    negative = schema.config.checks.negative_data_rejection
    negative.expected_statuses = [*negative.expected_statuses, "413"]
    failures, errors, operations = [], [], set()
    seen: dict[tuple[str, str], str] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            operations.add(event.recorder.label)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status is Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        seen[(check.name, failure.title)] = (
                            f"{event.recorder.label}: {check.name}: {failure.title}\n"
                            f"{failure.message}\n{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(event)
        elif isinstance(event, events.EngineFinished):
            failures = event.failures
    assert not errors, errors
    assert not failures, "\n\n".join(str(f) for f in failures)
    assert not seen, "\n\n".join(seen.values()) + fuzzed.daemon.log()[-5000:]
    assert len(operations) == 10, operations


def test_the_document_is_served_without_a_key_and_names_the_models(fuzzed: Gateway) -> None:
    response = httpx.get(f"{fuzzed.url}/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    infer = document["paths"]["/v2/models/{name}/infer"]
    assert infer["parameters"][0]["schema"]["enum"] == ["digits-large"]
    request = infer["post"]["requestBody"]["content"]["application/json"]["schema"]
    x = request["properties"]["inputs"]["items"]
    assert x["properties"]["name"]["const"] == "X"
    assert x["properties"]["datatype"]["const"] == "FP32"
    assert x["properties"]["shape"]["prefixItems"][1] == {"type": "integer", "const": 64}
    # the most items the limits in force let one request carry
    assert 1 < x["properties"]["shape"]["prefixItems"][0]["maximum"] <= 1024
    assert set(infer["post"]["responses"]) >= {"200", "400", "401", "409", "413", "422", "503"}


def test_values_that_overflow_the_model_get_422_and_the_connection_stays(fuzzed: Gateway) -> None:
    # Found by the fuzzing above: the answer was NaN, its encoding raised, the gateway
    # answered 500 and dropped the connection.
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [3e38] * 64}]}
    with fuzzed.client() as c:
        refused = c.post("/v2/models/digits-large/infer", json=body)
        assert refused.status_code == 422
        assert "answered NaN or infinity in output" in refused.json()["error"]
        fine = c.post(
            "/v2/models/digits-large/infer",
            json={"inputs": [{**body["inputs"][0], "data": [0.5] * 64}]},
        )
        assert fine.status_code == 200
    assert fuzzed.metric("cloud_gateway_model_runs_total", outcome="not_finite") >= 1
