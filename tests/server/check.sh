#!/usr/bin/env bash
# `sdrs serve` driven by the AUTOMATIC1111 client library webuiapi (from PyPI, in a virtual
# environment under target/), then a load test: 64 concurrent clients against a queue of 8.
# Run by .ci/run; needs python3 with venv. Prints what it checks and the load-test figures.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
# The environment is kept between runs (target/ is the build cache); a broken one is rebuilt.
venv=${SDRS_SERVER_VENV:-$target/server-venv}
if ! "$venv/bin/python" -c 'import webuiapi, requests, PIL' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/server/requirements.txt
fi

cargo build --quiet --locked --bin sdrs
"$venv/bin/python" tests/server/webuiapi_check.py "$target/debug/sdrs" tests/fixtures/tiny-sd15
