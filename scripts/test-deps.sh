#!/usr/bin/env bash
# What `make test` needs beyond cargo, installed once: cargo-nextest and cargo-fuzz; Python's
# kubernetes-validate and jsonschema (in target/test-venv) for the manifest checks; and, as
# root, iptables, iproute2, util-linux's setpriv and curl for the network-namespace pod tests,
# kubectl for kustomize and promtool (package prometheus) for the metrics format. Without root the pod tests skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
venv=target/test-venv
if ! "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  echo "test: installing kubernetes-validate and jsonschema into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate jsonschema pyyaml
fi
[ "$(id -u)" = 0 ] || exit 0
missing=()
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v curl >/dev/null || missing+=(curl)
# promtool (Prometheus' own linter) checks what /metrics serves.
command -v promtool >/dev/null || missing+=(prometheus)
# libFuzzer (the fuzz targets) is C++.
command -v g++ >/dev/null || missing+=(g++)
# kubectl (its kustomize renders the manifests): Google's package where that source is set
# up, else Debian's.
if ! command -v kubectl >/dev/null; then
  if apt-cache show kubectl >/dev/null 2>&1; then missing+=(kubectl); else missing+=(kubernetes-client); fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
