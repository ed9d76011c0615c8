# Two commands for a fresh Debian 12 machine, run as root:
#   make demo   set up, start the simulated ESXi lab and run the product against it
#   make test   set up and run the whole test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := golang-go golang-github-vmware-govmomi-dev openssh-server openssh-client util-linux iproute2 python3-venv systemd busybox git gnupg chromium groff-base man-db zsh fdisk dosfstools mtools ntfs-3g e2fsprogs xfsprogs fuse3 fusefat exfat-fuse lvm2
LAB_DIR ?= .lab

.PHONY: all setup apt venv lab-build lint test unit test-reliability-long test-ceph demo clean install uninstall \
	deb image test-packaging packaging-apt

all: test

# Debian packages the lab and the tests need: Go + govmomi (vcsim), OpenSSH (the simulated host's sshd),
# BusyBox (its ash is the ESXi shell: the lab tests check the quoting of remote commands against it);
# git and GnuPG (the git source: fetch, verify-commit of SSH and OpenPGP signatures); groff, man-db
# and zsh check the installed man page and completion scripts; Chromium (headless) loads the status
# page in tests/integration/test_web_lab.py.
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

# Opt-in, not in CI: the S3 tests against a throw-away single-node Ceph RGW (Debian's radosgw, one
# memstore OSD, no disk), started and removed by tests/ceph/rgw.sh. Root; ports 3300, 6800+ and CEPH_RGW_PORT.
CEPH_PACKAGES := ceph-mon ceph-osd radosgw curl
CEPH_RGW_PORT ?= 7480
test-ceph: setup
	$(MAKE) apt APT_PACKAGES="$(CEPH_PACKAGES)"
	tests/ceph/rgw.sh $(CURDIR)/.ceph $(CEPH_RGW_PORT) $(VENV)/bin/pytest tests/unit/test_repository_s3.py \
	  tests/unit/test_copy.py tests/unit/test_repo_s3_cli.py

# The reliability suite with its long variants (longer fuzzing, the bigger load lab), then its figures.
test-reliability-long: setup
	$(PY) -m bench.reliability_report --run --long

demo: setup
	$(PY) -m esxisim demo --state-dir $(LAB_DIR)

clean:
	-$(PY) -m esxisim down --state-dir $(LAB_DIR) 2>/dev/null
	rm -rf $(LAB_DIR) esxisim/build build .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .grimp_cache

# -- make install / make uninstall: the program like a package (FHS paths, PREFIX and DESTDIR aware) ---------
# `make install` (as root) puts the program where systemd/esxi-reconciler.service expects it (/usr/bin),
# its Python packages and their dependencies private to it in /usr/lib/esxi-reconciler (from PyPI, for
# the Python that runs it: RUN_PYTHON), the unit, bash and zsh completion and the man page (both generated
# from the parser), the JSON Schemas of the config and the example config. `make uninstall` removes
# exactly that. A package build stages it: make install DESTDIR=debian/tmp.
PREFIX      ?= /usr
DESTDIR     ?=
BINDIR      ?= $(PREFIX)/bin
LIBDIR      ?= $(PREFIX)/lib/esxi-reconciler
DATADIR     ?= $(PREFIX)/share/esxi-reconciler
MANDIR      ?= $(PREFIX)/share/man
UNITDIR     ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/vendor-completions
RUN_PYTHON  ?= $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
STAGE       := build/install

install: venv
	rm -rf $(STAGE) && mkdir -p $(STAGE)
	$(PY) -m reconciler.cli completion bash > $(STAGE)/esxi-reconciler.bash
	$(PY) -m reconciler.cli completion zsh > $(STAGE)/_esxi-reconciler
	$(PY) -m reconciler.cli _manpage > $(STAGE)/esxi-reconciler.1
	sed 's|/usr/bin/esxi-reconciler|$(BINDIR)/esxi-reconciler|' systemd/esxi-reconciler.service > $(STAGE)/esxi-reconciler.service
	sed -e 's|@PYTHON@|$(RUN_PYTHON)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e "s|@LIBDIR_FROM_BINDIR@|$$($(PYTHON) -c 'import os, sys; print(os.path.relpath(*sys.argv[1:]))' '$(LIBDIR)' '$(BINDIR)')|" \
	    packaging/esxi-reconciler.in > $(STAGE)/esxi-reconciler
	rm -rf '$(DESTDIR)$(LIBDIR)'
	$(RUN_PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
	    --target '$(DESTDIR)$(LIBDIR)' .
	rm -rf '$(DESTDIR)$(LIBDIR)/bin'
	install -D -m 755 $(STAGE)/esxi-reconciler '$(DESTDIR)$(BINDIR)/esxi-reconciler'
	install -D -m 644 $(STAGE)/esxi-reconciler.service '$(DESTDIR)$(UNITDIR)/esxi-reconciler.service'
	install -D -m 644 $(STAGE)/esxi-reconciler.bash '$(DESTDIR)$(BASHCOMPDIR)/esxi-reconciler'
	install -D -m 644 $(STAGE)/_esxi-reconciler '$(DESTDIR)$(ZSHCOMPDIR)/_esxi-reconciler'
	install -D -m 644 $(STAGE)/esxi-reconciler.1 '$(DESTDIR)$(MANDIR)/man1/esxi-reconciler.1'
	rm -rf '$(DESTDIR)$(DATADIR)'
	install -d -m 755 '$(DESTDIR)$(DATADIR)/schemas'
	install -m 644 reconciler/schemas/*.schema.json '$(DESTDIR)$(DATADIR)/schemas/'
	cd config.example && find . -type f | while read -r f; do \
	    install -D -m 644 "$$f" '$(DESTDIR)$(DATADIR)/config.example/'"$$f"; done
	install -D -m 644 systemd/esxi-reconciler.service.d/local.conf.example \
	    '$(DESTDIR)$(DATADIR)/esxi-reconciler.service.d/local.conf.example'

uninstall:
	rm -f '$(DESTDIR)$(BINDIR)/esxi-reconciler' '$(DESTDIR)$(UNITDIR)/esxi-reconciler.service' \
	    '$(DESTDIR)$(BASHCOMPDIR)/esxi-reconciler' '$(DESTDIR)$(ZSHCOMPDIR)/_esxi-reconciler' \
	    '$(DESTDIR)$(MANDIR)/man1/esxi-reconciler.1'
	rm -rf '$(DESTDIR)$(LIBDIR)' '$(DESTDIR)$(DATADIR)'

# -- make deb / make image: a Debian 12 package and an OCI image (docs/packaging.md) -------------------------
# `make deb` builds build/deb/esxi-reconciler_<version>_<arch>.deb with debhelper from a copy of the
# tracked files (debian/rules runs `make install` into the package tree) and runs lintian on it.
# DEB_VERSION=0.1.0+1 builds that version instead of debian/changelog's (a changelog entry is added
# to the copy). `make image` builds the container image from that .deb: build/image/ holds the OCI
# layout (oci/), a docker-archive for `docker load` and NAS container managers, and their digests.
DEB_BUILD  := build/deb
DEB_VERSION ?=
IMAGE_BUILD := build/image
IMAGE_NAME ?= esxi-reconciler
PACKAGING_APT := debhelper dh-python dpkg-dev python3-pip lintian mmdebstrap buildah

packaging-apt:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(PACKAGING_APT)"

deb: packaging-apt venv
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/src
	git ls-files -z --cached --others --exclude-standard \
	    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C $(DEB_BUILD)/src -xf -
	if [ -n "$(DEB_VERSION)" ]; then \
	  { printf 'esxi-reconciler (%s) bookworm; urgency=medium\n\n  * Rebuilt as %s.\n\n -- %s  %s\n\n' \
	      '$(DEB_VERSION)' '$(DEB_VERSION)' "$$(sed -n 's/^Maintainer: //p' debian/control)" \
	      "$$(date -R -u)"; \
	    cat debian/changelog; } > $(DEB_BUILD)/src/debian/changelog; fi
	cd $(DEB_BUILD)/src && BUILD_VENV=$(abspath $(VENV)) dpkg-buildpackage -b -us -uc --no-sign
	lintian --fail-on error,warning --info --display-info $(DEB_BUILD)/*.changes
	ls -l $(DEB_BUILD)/*.deb

# The image's timestamps are the date of the changelog the .deb was built from, so that two builds of
# one .deb are identical.
image: deb
	SOURCE_DATE_EPOCH=$$(dpkg-parsechangelog -l $(DEB_BUILD)/src/debian/changelog -S Timestamp) \
	    packaging/image.sh $$(ls $(DEB_BUILD)/*.deb) $(IMAGE_BUILD)

# The slow packaging tests (about 15 minutes): the .deb in a throwaway Debian root against the lab,
# the image against the lab, the image built twice for the same digest. Not part of `make test`.
test-packaging: setup packaging-apt
	ESXI_RECONCILER_TEST_PACKAGING=1 $(VENV)/bin/pytest tests/packaging
