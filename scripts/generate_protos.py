"""Regenerate the gRPC stubs in edge_agent/grpc/_generated/ from proto/.

proto/ is the only source of the gRPC code; tests/unit/test_generated.py fails when the
committed stubs differ from what this script produces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_PATH = "edge_agent/grpc/_generated"


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root/edge_agent/grpc/_generated and return their paths."""
    target = out_root / PACKAGE_PATH
    target.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    # Mapping proto/ onto the package path makes protoc emit package-qualified imports
    # (`from edge_agent.grpc._generated import ...`), so nothing needs patching afterwards.
    args = [
        "protoc",
        f"--proto_path={PACKAGE_PATH}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"{PACKAGE_PATH}/{p.name}" for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in target.iterdir() if p.name.endswith((".py", ".pyi")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=ROOT, help="root to write the package tree under"
    )
    for path in generate(parser.parse_args().out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path, file=sys.stderr)


if __name__ == "__main__":
    main()
