#!/usr/bin/env bash
# What `make test` needs beyond cargo, installed once: cargo-nextest, and for the
# network-namespace pod tests (root only) iptables, iproute2, util-linux's setpriv and curl.
# Without root nothing is installed and the pod tests skip, saying why.
set -euo pipefail
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
[ "$(id -u)" = 0 ] || exit 0
missing=()
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
