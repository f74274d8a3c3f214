"""What both daemons run models with: repository, onnxruntime wrapper, tensor codecs, confidence."""

from model_runtime.confidence import ConfidenceMethod, OutputKind, confidence
from model_runtime.errors import (
    InvalidInput,
    LimitExceeded,
    ModelError,
    ModelLoadError,
    ModelNotFound,
    OutputNotFinite,
    RequestTooLarge,
    UnsupportedEncoding,
)
from model_runtime.model_config import ModelConfig, load_model_config, write_model_config
from model_runtime.onnx_model import OnnxModel, Prediction
from model_runtime.repository import ModelRepository
from model_runtime.tensors import TensorSpec

__all__ = [
    "ConfidenceMethod",
    "InvalidInput",
    "LimitExceeded",
    "ModelConfig",
    "ModelError",
    "ModelLoadError",
    "ModelNotFound",
    "ModelRepository",
    "OnnxModel",
    "OutputKind",
    "OutputNotFinite",
    "Prediction",
    "RequestTooLarge",
    "TensorSpec",
    "UnsupportedEncoding",
    "confidence",
    "load_model_config",
    "write_model_config",
]
