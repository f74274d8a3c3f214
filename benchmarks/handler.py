"""The agent's own work per call, without the network: its ModelInfer handler in a hot loop.

Builds the agent's objects as `edge-agent serve` does (the demo repository, the router with no
cloud, the metrics, InferenceService, V2Servicer) and calls the handler on a parsed request,
then serializes the answer, timing each stage by the thread's CPU time (min of 5 repeats,
steady on a shared machine). "floor" is what the floor servers of local_path.py do per call:
np.frombuffer and one onnxruntime run. Run it on two commits to see what a change bought:

    .venv/bin/python benchmarks/handler.py [--calls 20000] [--cnn]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import print_table

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc.convert import decode_infer_request, encode_infer_result
from edge_agent.grpc.v2_servicer import V2Servicer
from edge_agent.inference import InferenceService, ServerInfo
from edge_agent.metrics import AgentMetrics
from edge_agent.router_settings import router_config
from edge_agent.settings import AgentSettings
from model_runtime import ModelRepository
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from router import Router


class _Context:
    """The two ServicerContext calls a successful ModelInfer makes."""

    def time_remaining(self) -> None:
        return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--cnn", action="store_true", help="peers.py's CNN, not the demo model")
    args = parser.parse_args()
    calls = args.calls
    work = Path(tempfile.mkdtemp(prefix="bench-handler-"))
    settings = AgentSettings(state_dir=work / "state")
    if args.cnn:
        from peers import make_cnn

        cnn = make_cnn(work)
        name, input_name, x, root = cnn.name, cnn.input_name, cnn.x, cnn.repository
    else:
        name, input_name, root = "digits", "X", EDGE_REPOSITORY
        x = np.asarray(np.load(HELDOUT)["X"][:1], dtype=np.float32)
    repository = ModelRepository.load(root, inline_budget_s=settings.inline_run_budget_us / 1e6)
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, repository)
    router = await Router.open(router_config(settings, device_key=None), registry)
    service = InferenceService(
        repository, router, metrics, ServerInfo("bench", "0"), default_ttl_seconds=3600
    )
    servicer = V2Servicer(service, metrics, settings.max_message_bytes)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=input_name, datatype="FP32", shape=list(x.shape)
    )
    request = pb.ModelInferRequest(
        model_name=name, inputs=[tensor], raw_input_contents=[x.tobytes()]
    )
    model = repository.get(name)
    session = model._session  # the floor runs the very session the agent runs
    decoded = decode_infer_request(request, model, None)
    context = _Context()

    def cpu_us(stage: Callable[[], object]) -> float:
        timer = timeit.Timer(stage, timer=time.thread_time)
        return min(timer.repeat(number=calls, repeat=5)) / calls * 1e6

    async def cpu_us_async(stage: Callable[[], Awaitable[object]]) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.thread_time()
            for _ in range(calls):
                await stage()
            best = min(best, time.thread_time() - started)
        return best / calls * 1e6

    async def handler() -> bytes:
        response = await servicer.ModelInfer(request, context)  # type: ignore[arg-type]
        return bytes(response.SerializeToString())

    def floor() -> object:
        raw = request.raw_input_contents[0]
        return session.run(None, {input_name: np.frombuffer(raw, np.float32).reshape(x.shape)})

    result = await service.infer(decoded)
    rows = [
        ("floor: frombuffer + onnxruntime run", cpu_us(floor)),
        ("read the raw bytes (a copy)", cpu_us(lambda: request.raw_input_contents[0])),
        ("decode and check", cpu_us(lambda: decode_infer_request(request, model, None))),
        ("model run and confidence", cpu_us(lambda: model.predict(decoded.inputs))),
        ("infer: run, metrics, routing", await cpu_us_async(lambda: service.infer(decoded))),
        ("encode", cpu_us(lambda: encode_infer_result(result))),
        ("whole handler + serialize", await cpu_us_async(handler)),
    ]
    await router.close()
    print_table(
        f"{name}: the agent's ModelInfer handler in-process, CPU µs per call ({calls} calls, "
        "min of 5)",
        [(name, {"CPU µs/call": us}) for name, us in rows],
    )


if __name__ == "__main__":
    asyncio.run(main())
