#!/usr/bin/env bash
# Generates the Python messages and gRPC stubs for protos/realalign/v1 into OUT/realalign/v1
# (default OUT: this folder). Uses grpcio-tools when importable, else Debian's protoc and
# grpc_python_plugin (apt-get install protobuf-compiler protobuf-compiler-grpc).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
protos="$(cd "$here/../../protos" && pwd)"
out="${1:-$here}"
python="${PYTHON:-python3}"
mkdir -p "$out/realalign/v1"
if "$python" -c "import grpc_tools.protoc" 2>/dev/null; then
  "$python" -m grpc_tools.protoc -I "$protos" --python_out="$out" --grpc_python_out="$out" "$protos"/realalign/v1/*.proto
else
  plugin="$(command -v grpc_python_plugin || true)"
  if ! command -v protoc >/dev/null || [ -z "$plugin" ]; then
    echo "need grpcio-tools, or protoc and grpc_python_plugin (apt-get install protobuf-compiler protobuf-compiler-grpc)" >&2
    exit 1
  fi
  protoc -I "$protos" --python_out="$out" --grpc_out="$out" --plugin=protoc-gen-grpc="$plugin" "$protos"/realalign/v1/*.proto
fi
touch "$out/realalign/__init__.py" "$out/realalign/v1/__init__.py"
echo "generated $(ls "$out"/realalign/v1/*_pb2*.py | wc -l) files in $out/realalign/v1"
