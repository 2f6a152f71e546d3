# Everything installs idempotently, as root, on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KREL := $(shell uname -r)
DEB_PACKAGES := bpfcc-tools python3-bpfcc linux-headers-amd64 redis-server redis-tools \
	memcached prometheus iproute2 nftables strace python3-venv python3-pyverbs rdma-core ibverbs-utils \
	python3-fusepy

.PHONY: setup demo test lint bench clean-setup

setup: $(VENV)/.installed kernel-headers tracefs

/var/lib/apt/.supervise-packages: Makefile
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@systemctl disable --now redis-server memcached prometheus >/dev/null 2>&1 || true
	@touch $@

# Kernels without a headers package borrow Debian's generic tree: build -> *-amd64, source -> *-common.
.PHONY: kernel-headers
kernel-headers: /var/lib/apt/.supervise-packages
	@if [ ! -e /lib/modules/$(KREL)/build/include ]; then \
		amd=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); \
		common=$$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1); \
		echo "kernel headers: borrowing $$amd for $(KREL)"; \
		mkdir -p /lib/modules/$(KREL); \
		ln -sfn $$amd /lib/modules/$(KREL)/build; \
		ln -sfn $$common /lib/modules/$(KREL)/source; \
	fi

.PHONY: tracefs
tracefs:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing

$(VENV)/.installed: pyproject.toml /var/lib/apt/.supervise-packages
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Every supervisor, tracer and test helper is a new Python process: with the bytecode written
# beforehand, none compiles the project's modules again (where PYTHONDONTWRITEBYTECODE is set,
# each would: 0.1–0.2 s a start).
.PHONY: bytecode
bytecode: setup
	@$(PY) -m compileall -q tracer rdma consensus supervise tests bench >/dev/null

demo: setup bytecode
	@$(VENV)/bin/supervise demo

# WORKERS=2 runs two test modules at a time, then the tests marked `serial` by themselves (those
# run even when the first part failed): about 12 minutes when one worker took 16 (one now takes
# about 13). Under that contention some tests' timing assumptions still fail now and then
# (bench/NOTES.md, "The test suite's time"), so one worker is the default.
WORKERS ?= 1
test: setup bytecode
	@$(VENV)/bin/ruff check .
	@if [ "$(WORKERS)" = 1 ]; then $(PY) -m pytest -q --durations=15 tests; else \
	rc=0; \
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not serial" --durations=15 tests || rc=$$?; \
	$(PY) -m pytest -q -m serial tests || rc=$$?; \
	exit $$rc; fi

lint: setup
	@$(VENV)/bin/ruff check .

bench: setup
	@for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
