# meshnet — the front door. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
# The lab (make demo) needs only the first line; the suite also drives podman, Chromium (graph
# rendering), Nuitka's toolchain (standalone binary) and containerd (its CRI plugin as a kubelet
# would drive it), which are heavy on a fresh machine.
LAB_PKGS  := iproute2 iputils-ping containernetworking-plugins sqlite3 kmod
TEST_PKGS := $(LAB_PKGS) chromium patchelf gcc podman runc busybox-static containerd
STAMP   := $(VENV)/.installed
LAB     ?= demo
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE   ?= meshnet/meshnet:$(VERSION)
CLUSTER ?= meshnet
OVERLAY ?= kind

.PHONY: help setup deps deps-lab _apt venv test test-unit lint golden proto cri-proto demo demo-wan demo-down bench bench-quick chaos clean-netns cni-binary up docker install e2e-kind down

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk 'BEGIN{FS=":.*## "}{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

setup: deps venv ## install Debian packages and the Python venv (idempotent; quick when nothing is missing)
	@# Bytecode written ahead, as a wheel install does: where PYTHONDONTWRITEBYTECODE is set (this
	@# project's machines) every meshnetd, CNI shim and meshnetctl start compiled meshnet from source
	@# again (a daemon restart spent ~0.1 s of its ~0.8 s on it). Up-to-date files are skipped.
	@$(PY) -m compileall -q meshnet >/dev/null

deps: ## install the Debian packages the lab and the tests need, when missing
	@$(MAKE) --no-print-directory _apt PKGS="$(TEST_PKGS)"

deps-lab: ## install only the Debian packages the lab (make demo) needs, when missing
	@$(MAKE) --no-print-directory _apt PKGS="$(LAB_PKGS)"

_apt:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 (3.11+) is required" >&2; exit 1; }
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "python3 must be 3.11 or newer" >&2; exit 1; }
	@[ -x $(PY) ] || python3 -m venv $(VENV) || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv $(VENV); }
	$(VENV)/bin/pip install -q --upgrade pip >/dev/null
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	@touch $@

test: setup ## set everything up and run the whole suite (root tests included when run as root)
	$(PYTEST) -q -p no:cacheprovider

test-unit: setup ## only the tests that need no root
	$(PYTEST) -q -m "not root"

SEED   ?= 13
ROUNDS ?= 20
chaos: setup ## a chaos soak on a 3-node lab (root): make chaos SEED=7 ROUNDS=20 (the suite runs 3 rounds of seed 13)
	MESHNET_CHAOS_SEED=$(SEED) MESHNET_CHAOS_ROUNDS=$(ROUNDS) $(PYTEST) -q -p no:cacheprovider tests/test_chaos.py

lint: setup ## ruff, mypy and the import contracts (the design's layers; pyproject.toml)
	$(VENV)/bin/ruff check meshnet tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

golden: setup ## regenerate tests/golden from the templates (review with git diff)
	$(PY) -m tests.golden_gen

proto: setup ## regenerate meshnet/proto/*_pb2*.py from meshnet.proto
	$(PY) -m grpc_tools.protoc -I meshnet/proto --python_out=meshnet/proto --grpc_python_out=meshnet/proto --pyi_out=meshnet/proto meshnet/proto/meshnet.proto
	sed -i 's/^import meshnet_pb2 as/from meshnet.proto import meshnet_pb2 as/' meshnet/proto/meshnet_pb2_grpc.py

cri-proto: setup ## regenerate tests/cri/api_pb2*.py (the suite's CRI client) from tests/cri/api.proto
	$(PY) -m grpc_tools.protoc -I tests/cri --python_out=tests/cri --grpc_python_out=tests/cri --pyi_out=tests/cri tests/cri/api.proto
	sed -i 's/^import api_pb2 as/from tests.cri import api_pb2 as/' tests/cri/api_pb2_grpc.py

demo: deps-lab venv ## run tests/3node.yml on 3 emulated nodes (every link a VXLAN) and print connectivity
	@$(VENV)/bin/meshnetctl lab down --name $(LAB) >/dev/null 2>&1 || true
	$(VENV)/bin/meshnetctl lab up tests/3node.yml --nodes 3 --name $(LAB) --ping
	@echo "  (or: make demo-down)"

demo-wan: deps-lab venv ## run the example WAN (tests/wan.yml: per-link delay, rate, a lossy link) on 2 emulated nodes
	@$(VENV)/bin/meshnetctl lab down --name wan >/dev/null 2>&1 || true
	$(VENV)/bin/meshnetctl lab up tests/wan.yml --nodes 2 --name wan --ping
	@echo "  (impairments in force: $(VENV)/bin/meshnetctl lab status --name wan; remove: make demo-down LAB=wan)"

demo-down: venv ## remove the demo lab
	$(VENV)/bin/meshnetctl lab down --name $(LAB)

bench: setup ## measure the speed targets and write docs/performance.md (ISP-sized labs included: long)
	$(PY) -m benchmarks.run --write docs/performance.md $(BENCH_ARGS)

bench-quick: setup ## the speed targets without the ISP-sized labs (minutes each)
	$(PY) -m benchmarks.run --write docs/performance.md --skip isp

clean-netns: ## remove what an interrupted test, benchmark or lab left: namespaces (mnt-, mnl-, mnb-), a killed run's labs whole
	scripts/cleanup

cni-binary: setup ## build the standalone CNI binary (no Python needed on the host) into build/cni-binary
	$(PY) scripts/build-cni-binary build/cni-binary

# A real cluster (kind and Docker do not run on the project's CI machines: see docs/install.md).
up: ## create a kind cluster: 1 control plane + 3 workers (needs kind and Docker)
	kind create cluster --name $(CLUSTER) --config manifests/overlays/kind/cluster.yaml

docker: ## build the image and load it into the kind cluster
	docker build -t $(IMAGE) -t meshnet/meshnet:latest .
	kind load docker-image $(IMAGE) --name $(CLUSTER)

# The peers' CA and node certificates: made here when missing, kept here (the CA key never leaves
# this directory: protect it; docs/security.md). Re-run `make install` after adding nodes.
PKI     ?= .pki
NODES_JSONPATH := {range .items[*]}{.metadata.name}={.status.addresses[?(@.type=="InternalIP")].address}{" "}{end}

install: venv ## install meshnet on the current kubectl context (OVERLAY=kind|kops|k3s|chained|base; certificates in PKI=.pki)
	kubectl apply -f manifests/base/namespace.yaml
	set -o pipefail; $(PY) -m meshnet.pki --dir $(PKI) --secret --node "$$(kubectl get nodes -o jsonpath='$(NODES_JSONPATH)')" | kubectl apply -f -
	kubectl apply -k manifests/$(if $(filter base,$(OVERLAY)),base,overlays/$(OVERLAY))
	kubectl -n meshnet rollout status ds/meshnet --timeout=180s

e2e-kind: up docker install ## the seed's walk-through on kind: 3node topology, ping every link
	kubectl apply -f tests/3node.yml
	kubectl wait --for=condition=Ready pod -l test=3node --timeout=180s
	kubectl exec r1 -- ping -c 1 12.12.12.2
	kubectl exec r2 -- ping -c 1 23.23.23.3
	kubectl exec r3 -- ping -c 1 13.13.13.1

down: ## delete the kind cluster
	kind delete cluster --name $(CLUSTER)
