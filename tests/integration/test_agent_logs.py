"""Logs: JSON lines, one event per request at DEBUG with its request id, never a payload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from model_runtime.demo import HELDOUT
from tests.integration.conftest import start_agent
from tests.support.processes import wait_until


def test_each_request_is_one_json_event_with_its_id_and_no_payload(tmp_path: Path) -> None:
    x = np.load(HELDOUT)["X"][:1]
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    agent = start_agent(tmp_path, "--log-level", "DEBUG")
    try:
        client = triton.InferenceServerClient(agent.address("grpc"))
        client.infer("digits", [inp], request_id="kiosk-7/42")
        bad = triton.InferInput("X", [1, 64], "FP32")
        bad.set_data_from_numpy(np.full((1, 64), np.nan, dtype=np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("digits", [bad], request_id="kiosk-7/43")

        def events() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
            return [e for e in lines if e.get("msg") == "infer"]

        wait_until(lambda: len(events()) >= 2, what="two request events in the log")
    finally:
        agent.stop()
    ok, refused = events()[:2]
    assert ok["request_id"] == "kiosk-7/42"
    assert (ok["code"], ok["route"], ok["model"]) == ("OK", "edge", "digits")
    assert refused["request_id"] == "kiosk-7/43"
    assert refused["code"] == "INVALID_ARGUMENT"
    assert "X: value at index [0, 0] is nan" in str(refused["problem"])
    # what identifies the call and how it ended, and nothing of its tensors
    identity = {"ts", "level", "logger", "msg", "site", "device"}
    assert set(ok) == identity | {"request_id", "model", "code", "route", "seconds"}
    assert set(refused) == identity | {"request_id", "model", "code", "route", "problem"}
