"""Generate the committed Python stubs from ``proto/swarmrt.proto``.

Usage: ``python -m swarmrt.wire.protogen [--check]``. ``--check`` exits 1 when
the committed stubs differ from what grpcio-tools generates now.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "swarmrt.proto"
OUT = pathlib.Path(__file__).resolve().parent / "proto"
STUBS = ("swarmrt_pb2.py", "swarmrt_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO)]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    # grpc's generator emits an absolute import of the sibling module; make it package-relative.
    grpc_file = out_dir / "swarmrt_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import swarmrt_pb2 as swarmrt__pb2", "from . import swarmrt_pb2 as swarmrt__pb2"))


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        return [name for name in STUBS if (pathlib.Path(tmp) / name).read_text() != (OUT / name).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale stubs: {', '.join(stale)}; run python -m swarmrt.wire.protogen", file=sys.stderr)
            return 1
        return 0
    generate(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
