#!/usr/bin/env bash
# `sdrs serve` driven by the AUTOMATIC1111 client library webuiapi (from PyPI, in a virtual
# environment under target/), a load test (64 concurrent clients against a queue of 8), and the
# web page in headless Chromium (Debian's chromium and chromium-driver, installed with apt-get
# when missing; selenium from PyPI). Run by .ci/run; needs python3 with venv. Prints what it
# checks and the load-test figures; the page's screenshot is left at target/server-page.png.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
# The environment is kept between runs (target/ is the build cache); a broken one is rebuilt.
venv=${SDRS_SERVER_VENV:-$target/server-venv}
if ! "$venv/bin/python" -c 'import webuiapi, requests, PIL, selenium' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/server/requirements.txt
fi

cargo build --quiet --locked --bin sdrs
# A copy, so that another build in the same target folder cannot swap the binary mid-run.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$target/debug/sdrs" "$work/sdrs"
model=tests/fixtures/tiny-sd15
"$venv/bin/python" tests/server/webuiapi_check.py "$work/sdrs" "$model"

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  # A fresh machine's package lists may be empty or stale: refresh them first.
  if ! { $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends chromium chromium-driver; } >"$work/apt.log" 2>&1; then
    if [ "${CI:-}" = true ]; then
      cat "$work/apt.log" >&2
      echo "cannot install chromium (CI=true requires the browser check)" >&2
      exit 1
    fi
    echo "skipped: the browser check: apt-get cannot install chromium and chromium-driver"
    exit 0
  fi
fi
"$venv/bin/python" tests/server/browser_check.py "$work/sdrs" "$model" "$target/server-page.png"
