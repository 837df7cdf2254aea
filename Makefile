# The same targets CI runs (.ci/run). Everything installs what it needs.
#
#   make demo    build bext and run it on the Next.js example app
#   make test    fixtures + fmt + clippy + the whole test suite + the
#                http-cache-tests conformance gate + 10 s of each fuzz target
#   make fuzz    every fuzz target for FUZZ_SECONDS (default 600) each
#   make bench   the benchmarks, saved under bench/results/

CARGO ?= cargo
DEMO_APP ?= tests/fixtures/next
DEMO_LISTEN ?= 127.0.0.1:3000

.PHONY: build install fixtures lint test fuzz fuzz-smoke demo bench-deps bench bench-smoke testssl clean

build:
	$(CARGO) build --release -p bext

PREFIX ?= /usr/local

# bext and bextctl, the systemd units (they expect PREFIX=/usr/local), and
# the example platform file (an existing /etc/bext/platform.toml is kept).
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/bext
	install -m 0755 target/release/bext target/release/bextctl $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 systemd/bext.service systemd/bext-platform.service $(DESTDIR)/etc/systemd/system/
	test -e $(DESTDIR)/etc/bext/platform.toml || \
	  install -m 0644 config-examples/platform.toml $(DESTDIR)/etc/bext/platform.toml

# npm packages of the fixture apps (npm ci from their lockfiles), their
# builds, and the Deno binary (npm package `deno`).
fixtures:
	bash tests/fixtures/setup.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p bext --features bench-ceiling -- -D warnings

# Tests named alone_* compare latencies: they run after the rest, one at
# a time, so the other tests' load does not skew them.
test: fixtures lint
	$(CARGO) test --workspace -- --skip alone_
	$(CARGO) test --workspace -- alone_ --test-threads 1
	bash tests/cache-tests/check.sh
	$(MAKE) fuzz-smoke

FUZZ_SECONDS ?= 600

# cargo-fuzz targets in fuzz/ (installed if missing), on a scratch copy of
# the committed corpus.
fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

fuzz-smoke:
	bash fuzz/run.sh 10

# bext installs and builds the app itself (npm ci, next build) if needed.
demo: build
	./target/release/bext run $(DEMO_APP) --listen $(DEMO_LISTEN)

bench-deps:
	scripts/apt-install.sh nginx-light varnish wrk curl python3 python3-pip util-linux valgrind testssl.sh openssl nghttp2-client

# testssl.sh against bext's HTTPS listener; fails on a HIGH or CRITICAL
# finding (about a minute, so not part of bench-smoke).
testssl: build bench-deps
	bash bench/testssl.sh

BENCHES ?= proxy proxy-layers cache platform deploy tls edge next-cache

bench: build fixtures bench-deps
	mkdir -p bench/results
	for b in $(BENCHES); do \
	  bash bench/$$b.sh | tee bench/results/$$b-$$(date -u +%Y%m%dT%H%M).md || exit 1; \
	done

# A one-second run of every benchmark: keeps the scripts working in CI.
# Asserts nothing about speed (this machine is shared and noisy).
bench-smoke: build fixtures bench-deps
	for b in $(BENCHES); do \
	  BENCH_DURATION=1s BENCH_CONNECTIONS=10 BENCH_SMOKE=1 bash bench/$$b.sh >/dev/null || exit 1; \
	done

clean:
	$(CARGO) clean
