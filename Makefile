# Ferrymesh. The two commands: `make demo` (the local mesh with the demo shop) and `make test`.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: demo test lint bench build crds

## demo: release build, then the controller, the shop (each instance with a sidecar) and the storefront on 127.0.0.1:8080
demo:
	$(CARGO) build --release --bins
	./target/release/ferryctl up --config-dir demo-apps/mesh

## test: every test (the integration tests run the real binaries, so those are built first)
test:
	@scripts/test-deps.sh
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast

## lint: formatting and clippy, warnings as errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: latency and throughput of direct, Ferrymesh 1 hop and 2 hops, HAProxy, nginx and Envoy 2 hops
bench:
	bench/setup.sh
	$(CARGO) build --release --bins -p ferrymesh-bench -p ferrymesh-proxy -p ferrymesh-controller
	./target/release/ferrymesh-bench

## crds: regenerate manifests/crds/ from the Rust types (a test fails when they are stale)
crds:
	$(CARGO) run -q -p ferrymesh-controller -- crds --out manifests/crds
