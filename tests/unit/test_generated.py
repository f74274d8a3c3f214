"""The committed gRPC stubs are exactly what proto/ generates (scripts/generate_protos.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_match_proto_sources(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "scripts" / "generate_protos.py"
    )
    assert spec is not None
    assert spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)

    fresh = {p.name: p.read_text() for p in generator.generate(tmp_path)}
    committed_dir = ROOT / "edge_agent" / "grpc" / "_generated"
    committed = {
        p.name: p.read_text() for p in committed_dir.iterdir() if p.name.endswith((".py", ".pyi"))
    }
    assert fresh.keys() == committed.keys(), "run scripts/generate_protos.py"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: run scripts/generate_protos.py"
