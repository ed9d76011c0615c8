# Two commands for a fresh Debian 12 machine, run as root:
#   make demo   set up, start the simulated ESXi lab and run the product against it
#   make test   set up and run the whole test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := golang-go golang-github-vmware-govmomi-dev openssh-server openssh-client util-linux iproute2 python3-venv systemd busybox git gnupg
LAB_DIR ?= .lab

.PHONY: all setup apt venv lab-build lint test unit test-reliability-long demo clean

all: test

# Debian packages the lab and the tests need: Go + govmomi (vcsim), OpenSSH (the simulated host's sshd),
# BusyBox (its ash is the ESXi shell: the lab tests check the quoting of remote commands against it);
# git and GnuPG (the git source: fetch, verify-commit of SSH and OpenPGP signatures).
apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

setup: apt venv lab-build

# Builds the Go half of the lab once (rebuilt only when its sources change).
lab-build: apt venv
	$(PY) -m esxisim build

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

# The whole suite: lint, type check, unit tests and the lab integration tests.
test: setup lint
	$(VENV)/bin/pytest

unit: venv
	$(VENV)/bin/pytest tests/unit

# The reliability suite with its long variants (longer fuzzing, the bigger load lab), then its figures.
test-reliability-long: setup
	$(PY) -m bench.reliability_report --run --long

demo: setup
	$(PY) -m esxisim demo --state-dir $(LAB_DIR)

clean:
	-$(PY) -m esxisim down --state-dir $(LAB_DIR) 2>/dev/null
	rm -rf $(LAB_DIR) esxisim/build .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .grimp_cache
