"""The on-device daemon: serves the local model over the Open Inference Protocol (gRPC)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-cloud-router")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
