# Two commands on a fresh Debian 12 machine, as root:
#   make demo   # installs everything, starts a 3-host local cluster, runs the portal (6 replicas)
#   make test   # installs what the tests need and runs the whole suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BERTH := $(VENV)/bin/berth
APT_PACKAGES := runc etcd-server etcd-client skopeo umoci docker-registry busybox-static nftables iproute2 util-linux prometheus
PORTAL := deploy/examples/portal/portal.yaml

.PHONY: deps apt venv demo down test unit integration lint proto

deps: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@python3 -c 'import ensurepip' 2>/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

demo: deps
	@if $(BERTH) dev status -o json 2>/dev/null | $(PY) -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["up"] else 1)'; then \
		echo "dev cluster 'dev' is already up (make down removes it)"; \
	else $(BERTH) dev up --hosts 3; fi
	$(BERTH) service apply -f $(PORTAL) --wait
	@echo
	$(BERTH) service ps portal -o table
	@echo
	@echo "Each replica answers at its address:"
	@$(BERTH) service ps portal -o json | $(PY) deploy/examples/portal/answers.py
	@echo
	@echo "Try: $(BERTH) service scale portal=9 ; $(BERTH) node ls ; make down"

down:
	$(BERTH) dev down

test: deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

unit: venv
	$(VENV)/bin/pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check controller agent cli proto tests bench
	$(VENV)/bin/ruff format --check controller agent cli tests bench
	$(VENV)/bin/mypy -p berth.controller -p berth.agent -p berth.cli -p berth.proto

proto: venv
	$(PY) -m berth.proto.generate
