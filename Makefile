# Every target calls the virtualenv's executables by path, so nothing needs
# activating. `make install` creates the virtualenv.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
# Each recipe runs in one shell, so `set -e` and shell variables span its lines.
.ONESHELL:
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
# Extra pip flags; .ci/run passes -qq to keep its log short.
PIP_FLAGS ?= -q

# Where the code lives; `lint` only names the directories that exist.
SRC_DIRS := $(wildcard tunnel tests examples benchmarks .ci)

# Generated code, rewritten as a whole by `make proto` and compared by `make proto-check`.
# (tunnel/_pb is named file by file: only those files are this target's.)
GEN_PATHS := tunnel/_pb/__init__.py tunnel/_pb/tunnel_pb2.py tunnel/_pb/tunnel_pb2.pyi \
	tunnel/testing/_pb tests/stubs/bp2 tests/stubs/pb

.PHONY: help install proto proto-check lint typecheck test check install-check test-newest-grpclib demo demo-library bench

help:
	@echo "make install      create $(VENV) and install the package with its dev and testing extras"
	@echo "make proto        regenerate all generated code from proto/"
	@echo "make proto-check  regenerate and fail if the committed generated code was stale"
	@echo "make lint         ruff check + ruff format --check"
	@echo "make typecheck    mypy --strict on tunnel/ and tests/ (configured in pyproject.toml)"
	@echo "make test         the whole test suite"
	@echo "make check        lint, typecheck, proto-check and test"
	@echo "make install-check build the wheel, pip install it into a fresh venv, run one forward and one reverse call"
	@echo "make test-newest-grpclib  the suite again, against the newest grpclib release (ignoring our pin)"
	@echo "make demo         a device behind NAT reached by key: backend, grpctunnel agent and router as processes"
	@echo "make demo-library forward and reverse tunnels in one process (python -m tunnel.demo)"
	@echo "make bench        run the benchmarks (python -m benchmarks)"

install:
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,testing]'

# All generated code comes from here; nothing under GEN_PATHS is edited by hand.
#
# Each generator writes into a fresh temporary directory, and the result
# replaces its target, so a message or file removed from a .proto file does
# not leave a stale module behind, and running this twice changes nothing.
#
# - tunnel/_pb: google protobuf (upb) classes for the grpctunnel.v1 frames.
#   protoc writes grpctunnel/v1/tunnel_pb2.py; it imports only google.protobuf
#   and google.rpc, never a sibling, so it can be moved up flat into tunnel/_pb.
# - tunnel/testing/_pb: betterproto 2.0.0b7 classes for grpchantesting and for
#   the package-less grpctunnel/testing/testing.proto (TunnelTestService, the
#   reference's interop trigger), shipped with tunnel.testing. betterproto puts
#   a file without a package in the output root, so the trigger service's
#   classes are tunnel/testing/_pb/__init__.py itself; its stub still calls
#   /TunnelTestService/TriggerTestRPCs, as the contract says.
# - tests/stubs/bp2: betterproto2 classes, to test that betterproto2 stubs and
#   services run over the tunnel as they are generated.
# - tests/stubs/pb: google protobuf classes plus grpclib's own stubs
#   (test_grpc.py). See the sed below.
#
# Plugins (protoc-gen-python_betterproto, -python_betterproto2,
# -grpclib_python) and the `ruff`/`black` that the betterproto compilers run
# are found on PATH, so the virtualenv's bin directory goes first.
# google/protobuf/*.proto come with grpc_tools (it adds its own -I);
# google/rpc/status.proto comes with googleapis-common-protos in site-packages.
proto:
	@export PATH="$(abspath $(VENV))/bin:$$PATH"
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
	[ -f "$$site/google/rpc/status.proto" ] || { echo "no google/rpc/status.proto in $$site" >&2; exit 1; }
	protoc="$(PY) -m grpc_tools.protoc -I proto -I $$site"
	tmp=$$(mktemp -d)
	trap 'rm -rf "$$tmp"' EXIT
	# The betterproto plugins log "Writing <file>" on stderr; keep everything else.
	run() { "$$@" 2> "$$tmp/err" || { cat "$$tmp/err" >&2; return 1; }; grep -v '^Writing ' "$$tmp/err" >&2 || true; }
	mkdir -p "$$tmp"/{pb,bp,bp2,stubs}
	run $$protoc --python_out="$$tmp/pb" --pyi_out="$$tmp/pb" proto/grpctunnel/v1/tunnel.proto
	run $$protoc --python_betterproto_out="$$tmp/bp" \
	    proto/grpchantesting/test.proto proto/grpctunnel/testing/testing.proto
	run $$protoc --python_betterproto2_out="$$tmp/bp2" \
	    --python_betterproto2_opt=client_generation=async,server_generation=async \
	    proto/grpchantesting/test.proto
	run $$protoc --python_out="$$tmp/stubs" --pyi_out="$$tmp/stubs" --grpclib_python_out="$$tmp/stubs" \
	    proto/grpchantesting/test.proto
	# tunnel/_pb: only the files this target owns are replaced.
	mkdir -p tunnel/_pb
	mv "$$tmp"/pb/grpctunnel/v1/tunnel_pb2.py "$$tmp"/pb/grpctunnel/v1/tunnel_pb2.pyi tunnel/_pb/
	echo '"""Generated by `make proto` from proto/grpctunnel/v1/tunnel.proto; do not edit."""' \
	    > tunnel/_pb/__init__.py
	rm -rf tunnel/testing/_pb tests/stubs/bp2 tests/stubs/pb
	mkdir -p tunnel/testing tests/stubs/pb
	mv "$$tmp/bp" tunnel/testing/_pb
	mv "$$tmp/bp2" tests/stubs/bp2
	mv "$$tmp"/stubs/grpchantesting/test_pb2.py "$$tmp"/stubs/grpchantesting/test_pb2.pyi tests/stubs/pb/
	# grpclib's plugin imports the pb2 module by its proto path
	# (`import grpchantesting.test_pb2`) and spells every type through it, which
	# only works with proto/ itself on sys.path. A top-level `grpchantesting`
	# package would be a second, unrelated copy on sys.path for every test, so
	# the module is rewritten to import its sibling relatively instead. The
	# proto keeps its canonical name grpchantesting/test.proto in the upb
	# descriptor pool (what server reflection and Go peers report).
	sed -e 's/^import grpchantesting\.test_pb2$$/from . import test_pb2/' \
	    -e 's/\bgrpchantesting\.test_pb2\./test_pb2./g' \
	    "$$tmp/stubs/grpchantesting/test_grpc.py" > tests/stubs/pb/test_grpc.py
	grep -q '^from \. import test_pb2$$' tests/stubs/pb/test_grpc.py \
	    || { echo "grpclib stub import not rewritten; did the plugin output change?" >&2; exit 1; }
	echo '"""Generated by `make proto` from proto/grpchantesting/test.proto; do not edit."""' \
	    > tests/stubs/pb/__init__.py

proto-check: proto
	@# Untracked generated files count as stale too.
	untracked=$$(git ls-files --others --exclude-standard -- $(GEN_PATHS))
	if [ -n "$$untracked" ]; then
	    echo "make proto created files that are not committed:" >&2
	    echo "$$untracked" >&2
	    exit 1
	fi
	git diff --exit-code --stat -- $(GEN_PATHS) \
	    || { echo "generated code is stale: run 'make proto' and commit the result" >&2; exit 1; }

lint:
	$(VENV)/bin/ruff check $(SRC_DIRS)
	$(VENV)/bin/ruff format --check $(SRC_DIRS)

typecheck:
	$(VENV)/bin/mypy

test:
	$(PY) -m pytest -q

check: lint typecheck proto-check test

# What a user's plain `pip install` gets: build the sdist and the wheel from it
# (isolated, as any installer builds them), install the wheel into a fresh
# virtualenv with the run-time dependencies only (no extras), and run
# .ci/install_check.py there with `python -I` from outside the source tree.
# The build log is shown only when the build fails; the temporary directory
# (sdist, wheel, virtualenv) is removed however it ends.
# The suite against the newest grpclib on the index, whatever our pin allows:
# every touch of grpclib's internals is in tunnel/_seam.py and checked by
# tests/seam/, so a release that moves one fails here, by name, before users
# meet it.  A virtualenv of its own, so .venv keeps the pinned release.
NEWEST_VENV := .venv-newest-grpclib
test-newest-grpclib:
	[ -x $(NEWEST_VENV)/bin/python ] || python3 -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install $(PIP_FLAGS) -e '.[dev,testing]'
	$(NEWEST_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade --no-deps grpclib
	$(NEWEST_VENV)/bin/python -c 'import importlib.metadata as m; print("grpclib", m.version("grpclib"))'
	$(NEWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

install-check:
	tmp=$$(mktemp -d)
	trap 'rm -rf "$$tmp"' EXIT
	$(PY) -m build --outdir "$$tmp/dist" . > "$$tmp/build.log" 2>&1 \
	    || { cat "$$tmp/build.log" >&2; echo "install-check: the build failed" >&2; exit 1; }
	wheels=("$$tmp"/dist/*.whl)
	[ "$${#wheels[@]}" -eq 1 ] && [ -f "$${wheels[0]}" ] \
	    || { echo "install-check: expected one wheel, got: $${wheels[*]}" >&2; exit 1; }
	python3 -m venv "$$tmp/venv"
	"$$tmp/venv/bin/python" -m pip install $(PIP_FLAGS) "$${wheels[0]}"
	cd "$$tmp"
	"$$tmp/venv/bin/python" -I "$(abspath .ci/install_check.py)"

# Real processes: a backend, `grpctunnel agent`, `grpctunnel router`, and a
# caller reaching the backend through the router by key (tunnel/cli/demo.py).
demo:
	$(PY) -m tunnel.cli.demo

demo-library:
	$(PY) -m tunnel.demo

# About 2-4 minutes; rewrites docs/benchmarks.md and .png. Installs the
# bench extra (matplotlib for the chart, uvloop for its columns) first.
# `$(PY) -m benchmarks --quick` is a ~30 s smoke run that writes only
# benchmarks/results/quick.json.
bench:
	$(PY) -m pip install $(PIP_FLAGS) -e '.[bench]'
	$(PY) -m benchmarks
