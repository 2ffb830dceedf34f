# Ferrymesh. The two commands: `make demo` (the local mesh with the demo shop) and `make test`.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: demo test fuzz lint bench build crds images kind-up kind-load gateway-api kind-deploy kind-down

## demo: release build, then the controller, the shop (each instance with a sidecar) and the storefront on 127.0.0.1:8080
demo:
	$(CARGO) build --release --bins
	./target/release/ferryctl up --config-dir demo-apps/mesh

## test: every test (the integration tests run the real binaries, so those are built first),
## after a short run of every fuzz target
test:
	@scripts/test-deps.sh
	$(CARGO) build --workspace --bins
	scripts/fuzz.sh
	$(CARGO) nextest run --workspace --no-fail-fast

## fuzz: every cargo-fuzz target under fuzz/ for FUZZ_SECONDS (default 15) each
fuzz:
	scripts/fuzz.sh

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

# === Kubernetes (kind): docs/install-kind.md walks through these ===
KIND ?= kind
CLUSTER ?= ferrymesh
VERSION ?= 0.1.0
IMAGES = proxy controller shop:ferry-shop ferryctl
# The Gateway API (standard channel: HTTPRoute, GRPCRoute, Gateway), pinned; kind does not ship it.
GATEWAY_API_VERSION ?= v1.4.0
GATEWAY_API_URL ?= https://github.com/kubernetes-sigs/gateway-api/releases/download/$(GATEWAY_API_VERSION)/standard-install.yaml

## images: build the four images from the one Dockerfile (needs Docker)
images:
	@for i in $(IMAGES); do target=$${i%%:*}; name=$${i##*:}; \
	  echo "docker build --target $$target -t ferrymesh/$$name:$(VERSION) ."; \
	  docker build --target $$target -t ferrymesh/$$name:$(VERSION) . || exit 1; done

## kind-up: a kind cluster from kind-config.yaml (installs kind into ~/.local/bin if missing)
kind-up:
	@command -v $(KIND) >/dev/null || scripts/install-kind.sh
	$(KIND) create cluster --config kind-config.yaml --name $(CLUSTER)

## kind-load: copy the images into the cluster's nodes
kind-load:
	$(KIND) load docker-image --name $(CLUSTER) ferrymesh/proxy:$(VERSION) ferrymesh/controller:$(VERSION) ferrymesh/ferry-shop:$(VERSION)

## gateway-api: the Gateway API CRDs (standard channel, GATEWAY_API_VERSION), before the mesh
gateway-api:
	kubectl apply --server-side -f $(GATEWAY_API_URL)
	kubectl wait --for=condition=Established --timeout=60s crd/httproutes.gateway.networking.k8s.io crd/grpcroutes.gateway.networking.k8s.io

## kind-deploy: the Gateway API, the mesh, then the shop (injected), then Jaeger and Prometheus
kind-deploy: gateway-api
	kubectl apply --server-side -k manifests/base
	kubectl -n ferrymesh-system rollout status deployment/ferrymesh-controller --timeout=180s
	kubectl apply --server-side -k manifests/demo
	kubectl apply --server-side -k manifests/observability
	kubectl -n ferrymesh-system rollout restart deployment/ferrymesh-controller
	kubectl -n ferrymesh-system rollout status deployment/ferrymesh-controller --timeout=180s
	kubectl -n shop wait --for=condition=Available deployment --all --timeout=300s

## kind-down: delete the cluster
kind-down:
	$(KIND) delete cluster --name $(CLUSTER)
