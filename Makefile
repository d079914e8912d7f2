# NeuroLens: `make run` serves the demo, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: run test test-ci test-all bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes; the stamp file records the last install.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The dashboard tests drive a real headless Chromium: Debian's package, installed here when it is
# missing and we may (root, or password-less sudo). Otherwise those tests skip and say why.
APT_GET := $(if $(filter 0,$(shell id -u)),apt-get,$(if $(shell sudo -n true 2>/dev/null && echo y),sudo apt-get))

.PHONY: browser
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ -n "$(APT_GET)" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium for the dashboard tests"; \
		$(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is not installed and cannot be installed here: the dashboard browser tests will be skipped"; \
	fi

# The Slurm executor's tests run against a real one-node cluster: Debian's slurmctld, slurmd,
# slurm-client and munge, installed here when missing and we may (as for the browser). The tests
# start the cluster themselves (deploy/slurm/cluster.sh, as root) or skip and say why.
.PHONY: slurm
slurm:
	@if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 \
		&& command -v munged >/dev/null 2>&1; then :; \
	elif [ -n "$(APT_GET)" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's slurmctld, slurmd, slurm-client and munge for the Slurm tests"; \
		$(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends \
			slurmctld slurmd slurm-client munge >/dev/null; \
	else \
		echo "Slurm is not installed and cannot be installed here: the Slurm tests will be skipped"; \
	fi

# The database tests also run on PostgreSQL: a throwaway cluster that tests/postgres.py starts
# from Debian's postgresql-15 binaries, installed here when missing and we may. Otherwise those
# tests skip and say why.
PG_BIN ?= /usr/lib/postgresql/15/bin

.PHONY: postgres
postgres:
	@if [ -x $(PG_BIN)/initdb ]; then :; \
	elif [ -n "$(APT_GET)" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's postgresql-15 for the database tests"; \
		$(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends postgresql-15 >/dev/null; \
	else \
		echo "postgresql-15 is not installed and cannot be installed here: the PostgreSQL tests will be skipped"; \
	fi

run: $(VENV)/.installed
	$(BIN)/neurolens serve --demo

test: $(VENV)/.installed browser slurm postgres
	$(PY) -m pytest -q

# The slow tests CI also runs after `make test` (marked `ci`): end-to-end runs worth their
# minutes on every submission, kept out of the default suite so that it stays near 10 minutes.
test-ci: $(VENV)/.installed browser slurm postgres
	$(PY) -m pytest -q -m ci

# The slow tests too (full-size presets, long kills-and-resumes).
test-all: $(VENV)/.installed browser slurm postgres
	$(PY) -m pytest -q -m ""

bench: $(VENV)/.installed
	$(PY) bench/server_load.py

clean:
	rm -rf $(VENV) neurolens-data .pytest_cache
