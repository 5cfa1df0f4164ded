"""Regenerates peer/_proto from proto/peer.proto with grpcio-tools (a development tool).

`python -m peer.protogen` writes the files; `generate()` returns their text so a test can
compare it with what is committed."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "peer.proto"
OUT = ROOT / "peer" / "_proto"
FILES = ("peer_pb2.py", "peer_pb2.pyi", "peer_pb2_grpc.py")


def generate() -> dict[str, str]:
    """Runs protoc into a temp dir and returns {file name: text}, imports made package-relative."""
    from grpc_tools import protoc  # development dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO.parent}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        texts = {name: (Path(tmp) / name).read_text() for name in FILES}
    texts["peer_pb2_grpc.py"] = re.sub(
        r"^import peer_pb2 as", "from . import peer_pb2 as", texts["peer_pb2_grpc.py"], flags=re.M)
    return texts


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in generate().items():
        (OUT / name).write_text(text)
    (OUT / "__init__.py").write_text('"""Generated from proto/peer.proto by `make proto`; never edit."""\n')
    print(f"wrote {', '.join(FILES)} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
