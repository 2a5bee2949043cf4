# ScalableChat: the two commands are `make run` and `make test`.

CARGO ?= cargo
NPM ?= npm
CONFIG ?= config/default.toml

.PHONY: flood run test test-all lint unit-test cluster-topology-test fuzz-quick fuzz-long frontend frontend-test e2e services-up services-down cluster cluster-down clean bench bench-quick bench-doc bench-profile

## run: build the web client and a release binary, start a standalone node on 127.0.0.1:8080
run: frontend
	$(CARGO) build --release
	./target/release/scalable-chat --config $(CONFIG)

## test: lints, then every test with the services of both topologies up (started and stopped
## here when not running): the single one (one Redis, one Kafka broker) and the cluster one
## (Redis Cluster, three Kafka brokers), see scripts/services
TOPOLOGIES ?= single cluster
test: lint
	TOPOLOGIES="$(TOPOLOGIES)" scripts/with-services $(MAKE) test-all

test-all: unit-test cluster-topology-test frontend-test e2e fuzz-quick faults faults-cluster

## cluster-topology-test: the tests of the services themselves and of several nodes, again on the
## cluster topology (TOPOLOGY=cluster: Redis Cluster with sharded pub/sub, three Kafka brokers)
CLUSTER_TOPOLOGY_TESTS = --test cluster --test scripts --test persist --test kafka --test cluster_state --test rooms_scan
cluster-topology-test:
	TOPOLOGY=cluster $(CARGO) test $(CLUSTER_TOPOLOGY_TESTS)

## lint: formatting, clippy with warnings as errors, and the one-way layers of src/
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	scripts/check-layers

## unit-test: Rust unit and integration tests (they start real nodes; cluster tests need the services)
unit-test:
	$(CARGO) test

## fuzz-quick / fuzz-long: every cargo-fuzz target in fuzz/ for FUZZ_SECS / FUZZ_LONG_SECS seconds
## (nightly toolchain; cargo-fuzz is installed when missing)
FUZZ_SECS ?= 30
FUZZ_LONG_SECS ?= 600
fuzz-quick:
	scripts/fuzz $(FUZZ_SECS)

fuzz-long:
	scripts/fuzz $(FUZZ_LONG_SECS)

frontend/node_modules/.package-lock.json: frontend/package-lock.json
	cd frontend && $(NPM) ci --no-audit --no-fund

## frontend: build the web client into frontend/dist (served at /)
frontend: frontend/node_modules/.package-lock.json
	cd frontend && $(NPM) run build

frontend-test: frontend/node_modules/.package-lock.json
	cd frontend && $(NPM) test

## e2e: the web client in real Chromium against a real node
e2e: frontend
	scripts/ensure-chromium
	$(CARGO) build
	cd frontend && SCALABLE_CHAT_BIN=../target/debug/scalable-chat $(NPM) run e2e

## services-up / services-down: Redis, Kafka and MongoDB-compatible FerretDB on 127.0.0.1;
## TOPOLOGY=cluster for Redis Cluster and three Kafka brokers instead of one of each
TOPOLOGY ?= single
services-up:
	TOPOLOGY=$(TOPOLOGY) scripts/services up

services-down:
	TOPOLOGY=$(TOPOLOGY) scripts/services down

## test-faults: fault injection against the real services, one scenario at a time (see docs/RELIABILITY.md):
## Kafka, FerretDB and Redis stopped under load, nodes killed or drained, the relay cut off, a client that never reads.
## `make faults` runs the ignored ones with the services already up (the SIGTERM drain runs in
## `cargo test`); it is the last step of `make test`. The scenarios stop and start the services with
## scripts/services and leave them running, so with-services still stops those it started.
.PHONY: test-faults faults faults-cluster
test-faults:
	scripts/with-services $(CARGO) test --test faults -- --include-ignored --test-threads=1 --nocapture --skip cluster_

faults:
	$(CARGO) test --test faults -- --ignored --test-threads=1 --nocapture --skip cluster_

## faults-cluster: the fault scenarios of the cluster topology (the tests named cluster_*: a Kafka partition
## leader and a Redis master killed, a slot migrated, a Redis master paused, a node.id in use), with its
## services up (started and stopped here when not running); `make faults` and `make test-faults` leave them out.
faults-cluster:
	TOPOLOGY=cluster TOPOLOGIES=cluster scripts/with-services $(CARGO) test --test faults -- --include-ignored --test-threads=1 --nocapture cluster_

## cluster / cluster-down: the services and three nodes on 127.0.0.1:8081-8083 (TOPOLOGY as above)
cluster: frontend
	TOPOLOGY=$(TOPOLOGY) scripts/cluster up

cluster-down:
	TOPOLOGY=$(TOPOLOGY) scripts/cluster down

## bench / bench-quick: ours against Socket.IO, Centrifugo and a raw tokio server (BENCHMARKS.md),
## pinned (server and its services on one core, the load generator on the other), then W1
## unpinned as the second table; every table of BENCHMARKS.md is refreshed from bench/results/
bench:
	bench/run full
	PIN=0 WORKLOADS=w1 bench/run full

bench-quick:
	bench/run quick
	PIN=0 WORKLOADS=w1 bench/run quick

## bench-profile: where our node's CPU goes in one W1 step, pinned (bench/profile; RATE=300; WINDOW=ms sets limits.fanout_window_ms)
RATE ?= 300
bench-profile:
	bench/profile $(RATE)

## bench-doc: refresh the tables of BENCHMARKS.md from the committed results, running nothing
bench-doc:
	cd bench && cargo build --release --quiet
	for d in bench/results/full bench/results/full-unpinned bench/results/quick bench/results/quick-unpinned; do \
	  [ -d $$d ] || continue; bench/target/release/chatbench report $$d > /dev/null && \
	  bench/target/release/chatbench doc BENCHMARKS.md $$d || exit 1; done

## scaling: per-message costs of every process on the cluster topology (bench/scaling, for
## docs/SCALING.md); results in bench/results/scaling/. SCALING_TOPOLOGIES="cluster single" for both.
SCALING_TOPOLOGIES ?= cluster
.PHONY: scaling
scaling:
	for t in $(SCALING_TOPOLOGIES); do bench/scaling $$t || exit 1; done

## flood: what one flooding client address costs everyone else, with the default limits and
## without them (bench/flood); results in bench/results/flood/
flood:
	bench/flood

clean:
	$(CARGO) clean
	rm -rf frontend/dist frontend/node_modules data
