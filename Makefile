# tollgate: `make run` to try it, `make test` for the full suite.
SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LISTEN ?= 127.0.0.1:9501
UPSTREAM ?= 127.0.0.1:9502

.PHONY: run test lint deps build fmt bench clean prometheus-deps prometheus test-dashboard test-alerts

# pingora-core builds zlib-ng from source and needs cmake; pingora-openssl
# builds its bundled OpenSSL with perl and make. tests/tls.rs drives the
# real TLS clients openssl, curl and python3 (it installs them itself too).
deps:
	@command -v cmake >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake; }
	@command -v perl >/dev/null && command -v make >/dev/null && command -v openssl >/dev/null && \
		command -v curl >/dev/null && command -v python3 >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq perl make openssl curl python3; }

build: deps
	$(CARGO) build --release --bins

# Starts the bundled ozeki-sim upstream and tollgate with the sample config.
run: build
	@set -m; \
	target/release/ozeki-sim --listen $(UPSTREAM) --user johnjr:sub1pass:10 & sim=$$!; \
	trap 'kill $$sim 2>/dev/null' EXIT INT TERM; \
	sleep 0.3; \
	echo; \
	echo "tollgate: point your Ozeki clients at http://$(LISTEN)/api (upstream ozeki-sim on $(UPSTREAM))"; \
	echo "          metrics and admin API on http://127.0.0.1:9601 ; try:"; \
	echo "          curl 'http://$(LISTEN)/api?action=getcredits&username=john&password=secret1'"; \
	echo; \
	target/release/tollgate run -c conf/tollgate.yaml

# The full suite: unit, property and integration tests (integration tests
# start the real binaries on ephemeral loopback ports).
test: deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) test --doc && $(CARGO) nextest run --lib --bins --tests --no-fail-fast; \
	else \
		$(CARGO) test --doc && $(CARGO) test --lib --bins --tests --no-fail-fast; \
	fi

lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

bench: deps
	$(CARGO) bench

clean:
	$(CARGO) clean

# Debian's prometheus package (prometheus + promtool) for the dashboard and
# alert tests and `make prometheus`; the tests install it by themselves too.
prometheus-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ $(SUDO) apt-get install -y -qq prometheus || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus; }; }

# A Prometheus on 127.0.0.1:9090 scraping the tollgate of `make run` with the
# sample config (dashboards/prometheus.yml); data under target/prometheus.
prometheus: prometheus-deps
	prometheus --config.file=dashboards/prometheus.yml --storage.tsdb.path=target/prometheus \
		--web.listen-address=127.0.0.1:9090

# Every PromQL query of dashboards/ against a real Prometheus.
test-dashboard: deps prometheus-deps
	$(CARGO) test --test dashboard

# The alerting and recording rules: promtool's checks and unit tests, then
# tests/alerts.rs (every alert tested firing and quiet, documented, and
# reading only metrics tollgate exports). Both are part of `make test`.
test-alerts: deps prometheus-deps
	promtool check rules dashboards/tollgate-recording.yml dashboards/tollgate-alerts.yml
	promtool test rules dashboards/tests/tollgate-alerts.test.yml
	$(CARGO) test --test alerts

# Persistence: the kill -9 crash test (CRASH_ITERATIONS=20 by default) and
# the in-process durable-throughput benchmark (release build).
.PHONY: crash-test bench-store
crash-test: deps
	$(CARGO) test --test crash -- --nocapture

bench-store: deps
	$(CARGO) bench --bench store

# Fuzzing (cargo-fuzz on the stable toolchain). The bundled SQLite trips a
# false AddressSanitizer ODR report at start-up, hence the ASAN_OPTIONS.
FUZZ_TARGETS := ozeki_params acceptreport boxis_form soap_envelope owned multipart
FUZZ_SECONDS ?= 300
.PHONY: fuzz
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzzing $$t for $(FUZZ_SECONDS)s"; \
		RUSTC_BOOTSTRAP=1 ASAN_OPTIONS=detect_odr_violation=0 \
		  $(CARGO) fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

# End-to-end load benchmark (issue 8): direct, nginx, tollgate passthrough,
# tollgate sendmessage (async, sync) and local getcredits, side by side.
.PHONY: bench-e2e
bench-e2e: deps
	$(CARGO) build --release --bins
	bash benches/e2e/run.sh

# Resident memory per account (1 M and 10 M accounts, credentials included)
# and start-up time with 10 M accounts in the store (issue 8). The 10 M
# store is generated once and cached under target/bench-memory/.
.PHONY: bench-memory
bench-memory: deps
	$(CARGO) bench --bench memory

# Open-loop latency (issue 17): p50/p99/p99.9 of direct, nginx, tollgate
# passthrough and sendmessage (async, sync) at 25/50/75 % of nginx's peak,
# oha with --latency-correction (installed into target/tools when absent),
# interleaved rounds; results in benches/e2e/latency.md.
.PHONY: bench-latency
bench-latency: deps
	$(CARGO) build --release --bins
	BENCH_COMMAND="make bench-latency" bash benches/e2e/latency.sh

# Evidence that holds on a busy machine (issue 17, benches/e2e/tail.md):
# instructions per request under callgrind (SCENARIO passthrough, async,
# sync, getcredits; CONN keepalive or close), and one open-loop run under
# perf sched (SCENARIO, RATE req/s): per-thread switches and scheduling delay.
.PHONY: bench-callgrind bench-sched
SCENARIO ?= async
CONN ?= keepalive
RATE ?= 5000
bench-callgrind: deps
	$(CARGO) build --release --bins
	bash benches/e2e/callgrind.sh $(SCENARIO) $(CONN)

bench-sched: deps
	$(CARGO) build --release --bins
	bash benches/e2e/sched.sh $(SCENARIO) $(RATE)

# Several nodes on one PostgreSQL ledger (README "Running several nodes"):
# ozeki-sim, three tollgate nodes on the local PostgreSQL (database
# tollgate_cluster, created when missing) and nginx in front of them
# (installed when absent); prints the client and admin ports, Ctrl-C stops.
.PHONY: run-cluster bench-cluster
run-cluster: build
	@bash deploy/cluster/run-cluster.sh

# SQLite against PostgreSQL on one node, PostgreSQL statements per 1000
# sends, 1/2/3 nodes behind nginx (wrk, oha), stranded credit; a markdown
# table on stdout (benches/cluster/bench.sh).
bench-cluster: deps
	$(CARGO) build --release --bins
	bash benches/cluster/bench.sh
