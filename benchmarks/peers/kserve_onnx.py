"""KServe's Python model server serving an ONNX file with onnxruntime, the session made as the
edge agent makes its own (one thread, no spinning), logging at WARNING (at INFO it logs every
request, a quarter of its throughput), latency logging off; REST, and v2 gRPC too when given a
GRPC_PORT. Runs inside .venv-kserve (benchmarks/peers/setup.sh):

    .venv-kserve/bin/python benchmarks/peers/kserve_onnx.py MODEL.onnx NAME HTTP_PORT [GRPC_PORT]
"""

from __future__ import annotations

import logging
import sys

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.logging import logger
from kserve.utils.utils import from_np_dtype


class OnnxModel(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        outputs = []
        for name, array in zip(self.outputs, self.session.run(self.outputs, feeds), strict=True):
            output = InferOutput(name, list(array.shape), from_np_dtype(array.dtype))
            output.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            outputs.append(output)
        return InferResponse(payload.id or "", self.name, outputs)


def main() -> None:
    path, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    grpc_port = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    server = ModelServer(
        http_port=port,
        grpc_port=grpc_port,
        enable_grpc=bool(grpc_port),
        workers=1,
        enable_latency_logging=False,
    )
    # After the server configured logging: no line per request.
    for name_ in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(name_).setLevel(logging.WARNING)
    logger.setLevel(logging.WARNING)
    server.start([OnnxModel(name, path)])


if __name__ == "__main__":
    main()
