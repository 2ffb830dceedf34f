#!/usr/bin/env bash
# Installs kind (https://kind.sigs.k8s.io) into ~/.local/bin, for `make kind-up`.
set -euo pipefail
version=v0.30.0
arch=$(uname -m); case "$arch" in x86_64) arch=amd64;; aarch64|arm64) arch=arm64;; esac
os=$(uname -s | tr '[:upper:]' '[:lower:]')
mkdir -p "$HOME/.local/bin"
echo "installing kind $version into ~/.local/bin"
curl -fsSLo "$HOME/.local/bin/kind" "https://kind.sigs.k8s.io/dl/$version/kind-$os-$arch"
chmod +x "$HOME/.local/bin/kind"
case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) echo "add ~/.local/bin to your PATH";; esac
