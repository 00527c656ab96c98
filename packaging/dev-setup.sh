#!/usr/bin/env bash
# Sets up a development/CI environment on Debian 12 from nothing: Debian packages (when root and missing),
# a virtualenv from Debian's python3 (so the same venv also works inside a systemd service), and the project
# installed editable with its test extras. Idempotent; used by `make` and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Runtime and build: ffmpeg, libsystemd-dev + pkg-config (systemd-python), a compiler and cmake (llama-cpp-python).
# Tests: rsync (a replacement pattern), redis-server (the remote pre-warm queue), systemd + util-linux (the sd-sandbox service tests), and what the .deb
# is built with and depends on (it installs into the sandbox from these).
debs=(ffmpeg libsystemd-dev pkg-config python3-venv python3-dev build-essential cmake rsync git
      systemd util-linux passwd redis-server
      debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel dpkg-dev fakeroot
      python3-msgpack python3-watchdog python3-structlog python3-systemd python3-rich python3-pydantic python3-prometheus-client)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "dev-setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "dev-setup: missing Debian packages: ${missing[*]}" >&2
    echo "dev-setup: run: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
# llama-cpp-python builds from source (a few minutes on 2 cores); portable CPU flags so the build
# does not depend on the build machine's exact CPU.
CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=off"} "$VENV/bin/python" -m pip install -q -e '.[test]'
touch "$VENV/.installed"
echo "dev-setup: ready ($VENV)"
