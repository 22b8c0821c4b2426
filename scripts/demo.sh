#!/usr/bin/env bash
# make demo: three instances (network namespaces) on a bridge, security groups
# applied with `sgctl apply`, traffic shown allowed and denied, all cleaned up.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m controller.tools.demo
