# etcdmux container image. Build from the repository root:
#   docker build -t etcdmux:0.1.0 .
# The tag is the version in Cargo.toml; the Helm chart's default image is
# etcdmux:<appVersion> (charts/etcdmux/Chart.yaml), the same version.
# Not built by `make test` (the build machine has no container engine).

# --- build ---
FROM rust:1.88-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p etcdmux \
 && install -D -m 0755 target/release/etcdmux /out/etcdmux

# --- runtime: glibc + libgcc only, no shell, runs as uid 65532 ---
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/etcdmux /usr/local/bin/etcdmux
USER 65532:65532
# 2379: etcd v3 gRPC (the chart's listener), 23790: `make run`'s listener,
# 23791: /metrics, /livez, /readyz
EXPOSE 2379 23790 23791
ENTRYPOINT ["etcdmux"]
CMD ["--config", "/etc/etcdmux/etcdmux.toml"]
