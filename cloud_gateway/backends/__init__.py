"""What runs the large model: EmbeddedBackend (onnxruntime here) or UpstreamBackend (a v2 server)."""

from cloud_gateway.backends.base import Backend
from cloud_gateway.backends.embedded import EmbeddedBackend
from cloud_gateway.backends.upstream import UpstreamBackend

__all__ = ["Backend", "EmbeddedBackend", "UpstreamBackend"]
