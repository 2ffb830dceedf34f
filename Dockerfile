# One build, one image per binary (distinct entrypoints):
#   docker build --target proxy      -t ferrymesh/proxy:0.1.0 .       # sidecar + init-iptables
#   docker build --target controller -t ferrymesh/controller:0.1.0 .  # controller, CA, injector
#   docker build --target shop       -t ferrymesh/ferry-shop:0.1.0 .  # the demo shop
#   docker build --target ferryctl   -t ferrymesh/ferryctl:0.1.0 .
# `make images` builds all four.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/ferrymesh-proxy target/release/ferrymesh-controller \
       target/release/ferry-shop target/release/ferryctl /out/

FROM debian:bookworm-slim AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The sidecar and its init container (which needs iptables, nft and legacy backends).
FROM base AS proxy
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ferrymesh-proxy /ferrymesh-proxy
USER 2340:2340
ENTRYPOINT ["/ferrymesh-proxy"]
CMD ["run", "--mode=sidecar"]

FROM base AS controller
COPY --from=build /out/ferrymesh-controller /ferrymesh-controller
USER 2341:2341
ENTRYPOINT ["/ferrymesh-controller"]

FROM base AS shop
COPY --from=build /out/ferry-shop /ferry-shop
USER 1000:1000
ENTRYPOINT ["/ferry-shop"]

FROM base AS ferryctl
COPY --from=build /out/ferryctl /ferryctl
ENTRYPOINT ["/ferryctl"]
