"""The contract of what runs the large model: the embedded onnxruntime or an upstream v2 server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from model_runtime.v2_json import InferRequest, InferResponse, ModelSignature

if TYPE_CHECKING:
    from cloud_gateway.openapi import ServedModel

__all__ = ["Backend"]


class Backend(Protocol):
    """Everything the gateway needs from a model server, in v2 terms and free of HTTP."""

    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def ready(self) -> bool:
        """Whether inference requests can be served now."""

    async def model_ready(self, name: str, version: str) -> bool:
        """Raises ModelNotFound for a model that is not served."""

    async def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        """The v2 metadata body; raises ModelNotFound."""

    async def signature(self, name: str, version: str) -> ModelSignature | None:
        """What requests are checked against; None when the model's inputs are not declared.

        Raises ModelNotFound when the backend knows the model is not served.
        """

    async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        """Run the model on a checked request."""

    def model_label(self, name: str) -> str:
        """A bounded metrics label for a model name taken from a URL."""

    def served_models(self) -> list[ServedModel] | None:
        """The models served and their signatures, for the OpenAPI document; None when only
        another server knows them (upstream mode)."""
