"""The bundled demo models and their held-out split; see MODEL_CARD.md beside this file."""

from pathlib import Path

__all__ = ["CLOUD_REPOSITORY", "EDGE_REPOSITORY", "HELDOUT", "MODEL_CARD"]

_HERE = Path(__file__).resolve().parent
EDGE_REPOSITORY = _HERE / "edge"
CLOUD_REPOSITORY = _HERE / "cloud"
HELDOUT = _HERE / "heldout.npz"
MODEL_CARD = _HERE / "MODEL_CARD.md"
