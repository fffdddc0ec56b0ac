#!/usr/bin/env bash
# Regenerates jalora/api/v1/jalora_pb2.py and jalora_pb2_grpc.py from jalora.proto. Run from anywhere.
#
# The checked-in files were made with grpcio-tools==1.74.0 (libprotoc 31.1, protobuf gencode 6.31.1):
# old gencode loads on every newer runtime (protobuf 6.31.1+ and 7.x, grpcio 1.74+), while gencode
# from a newer grpcio-tools refuses an older runtime. Keep the pin unless the floors move up:
#   python -m venv /tmp/protoc-venv && /tmp/protoc-venv/bin/pip install grpcio-tools==1.74.0
#   PYTHON=/tmp/protoc-venv/bin/python jalora/api/generate.sh
#
# Proto paths are rooted at the repository (-I .) so the generated modules import each other as
# jalora.api.v1.*. The proto package stays `jalora.v1` (the wire names clients and grpcurl see).
set -euo pipefail
cd "$(dirname "$0")/../.."
"${PYTHON:-python}" -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. \
  jalora/api/v1/jalora.proto
