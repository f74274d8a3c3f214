"""Errors raised by model_runtime; transports map them to status codes, never the reverse.

ModelError
├── ModelNotFound        no such model, or no such version of it
├── ModelLoadError       a repository entry is broken (missing file, invalid ONNX, bad config)
├── InvalidInput         a request's tensors do not fit the model's metadata
├── RequestTooLarge      a request is over the configured size limit
├── LimitExceeded        a request would cause more work than a configured limit allows
├── UnsupportedEncoding  a request body in a Content-Encoding other than gzip or identity
└── OutputNotFinite      the model answered NaN or infinity, which a v2 JSON body cannot hold
"""

from __future__ import annotations

__all__ = [
    "INVALID_INPUT_KINDS",
    "InvalidInput",
    "LimitExceeded",
    "ModelError",
    "ModelLoadError",
    "ModelNotFound",
    "OutputNotFinite",
    "RequestTooLarge",
    "UnsupportedEncoding",
]

INVALID_INPUT_KINDS = frozenset(
    {
        "invalid",  # anything not named below
        "missing_input",
        "unknown_input",
        "unknown_output",
        "datatype",
        "shape",
        "byte_size",
        "contents_conflict",  # both typed contents and raw contents given
        "non_finite",
        "parameter",
    }
)


class ModelError(Exception):
    """Base of every error model_runtime raises."""


class ModelNotFound(ModelError):
    def __init__(self, name: str, version: str = "") -> None:
        self.name = name
        self.version = version
        what = f"model '{name}' version '{version}'" if version else f"model '{name}'"
        super().__init__(f"{what} is not served here")


class ModelLoadError(ModelError):
    def __init__(self, model: str, problem: str) -> None:
        self.model = model
        self.problem = problem
        super().__init__(f"model '{model}': {problem}")


class InvalidInput(ModelError):
    """`field` names the offending tensor or parameter so the caller can fix the request.

    `kind` is one of a small fixed set (see INVALID_INPUT_KINDS), so metrics can count
    bad requests by what was wrong without unbounded label values.
    """

    def __init__(self, field: str, problem: str, kind: str = "invalid") -> None:
        self.field = field
        self.problem = problem
        self.kind = kind if kind in INVALID_INPUT_KINDS else "invalid"
        super().__init__(f"{field}: {problem}")


class RequestTooLarge(ModelError):
    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__(f"request is {size_bytes} bytes, over the limit of {limit_bytes} bytes")


class LimitExceeded(ModelError):
    """A request asks for more work than the operator allows: items, elements, answer bytes.

    `limit` names the limit (a fixed set, for metrics labels); `field` what the caller sent.
    """

    def __init__(self, field: str, problem: str, limit: str) -> None:
        self.field = field
        self.problem = problem
        self.limit = limit
        super().__init__(f"{field}: {problem}")


class UnsupportedEncoding(ModelError):
    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        super().__init__(f"Content-Encoding '{encoding}' is not supported; use gzip or none")


class OutputNotFinite(ModelError):
    """The model's answer to a request holds NaN or infinity: finite inputs far outside what it
    was trained on (a pixel of 4e28) can overflow it. JSON has no such numbers, and a NaN
    probability is no answer, so the request is refused rather than answered."""

    def __init__(self, model: str, output: str) -> None:
        self.model = model
        self.output = output
        super().__init__(
            f"model '{model}' answered NaN or infinity in output '{output}' for these inputs; "
            "check that their values are in the range the model expects"
        )
