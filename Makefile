# ScalableChat: the two commands are `make run` and `make test`.

CARGO ?= cargo
NPM ?= npm
CONFIG ?= config/default.toml

.PHONY: run test test-all lint unit-test fuzz-quick fuzz-long frontend frontend-test e2e services-up services-down cluster cluster-down clean bench bench-quick

## run: build the web client and a release binary, start a standalone node on 127.0.0.1:8080
run: frontend
	$(CARGO) build --release
	./target/release/scalable-chat --config $(CONFIG)

## test: lints, then every test with the services up (started and stopped here when not running)
test: lint
	scripts/with-services $(MAKE) test-all

test-all: unit-test frontend-test e2e fuzz-quick faults

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

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

## services-up / services-down: Redis, Kafka and MongoDB-compatible FerretDB on 127.0.0.1
services-up:
	scripts/services up

services-down:
	scripts/services down

## test-faults: fault injection against the real services, one scenario at a time (see docs/RELIABILITY.md):
## Kafka, FerretDB and Redis stopped under load, nodes killed or drained, the relay cut off, a client that never reads.
## `make faults` runs the ignored ones with the services already up (the SIGTERM drain runs in
## `cargo test`); it is the last step of `make test`. The scenarios stop and start the services with
## scripts/services and leave them running, so with-services still stops those it started.
.PHONY: test-faults faults
test-faults:
	scripts/with-services $(CARGO) test --test faults -- --include-ignored --test-threads=1 --nocapture

faults:
	$(CARGO) test --test faults -- --ignored --test-threads=1 --nocapture

## cluster / cluster-down: the services and three nodes on 127.0.0.1:8081-8083
cluster: frontend
	scripts/cluster up

cluster-down:
	scripts/cluster down

## bench / bench-quick: ours against Socket.IO, Centrifugo and a raw tokio server (BENCHMARKS.md)
bench:
	bench/run full

bench-quick:
	bench/run quick

clean:
	$(CARGO) clean
	rm -rf frontend/dist frontend/node_modules data
