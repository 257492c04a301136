# Two entry points (see README): `make demo` runs the main job, `make test` runs the whole test suite.
# Each creates ./.venv on first use and installs the exact versions of requirements/lock.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
EXTRAS := test,transformers,digits,tensorboard
STAMP := $(VENV)/.visionpe-installed

.PHONY: demo test test-unit test-wheel test-timm test-compat bench install lock clean

# The lock pins every package (setuptools, the build backend, included); visionpe itself is editable on top.
$(STAMP): $(LOCK) pyproject.toml setup.py
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/visionpe threecell --quick

# What CI runs: the suite, the wheel in a clean venv, timm's own model tests on our models.
test: test-unit test-wheel test-timm

test-unit: $(STAMP)
	$(PY) -m pytest -q

test-wheel: $(STAMP)
	bash tools/wheel_smoke.sh $(PY)

test-timm: $(STAMP)
	bash tools/timm_suite.sh $(PY)

# The HF and VLM tests under each transformers version of requirements/compat/ (oldest, previous, newest).
test-compat: $(STAMP)
	bash tools/test_compat.sh $(PY)

bench: $(STAMP)
	$(VENV)/bin/visionpe bench

# Refresh the lock: resolve pyproject.toml's ranges afresh (newest allowed versions) in a scratch venv.
# Then run `make test test-compat` and commit requirements/lock.txt with the result.
lock:
	rm -rf .lockenv
	$(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install -q --upgrade pip setuptools
	.lockenv/bin/python -m pip install -q --no-build-isolation '.[$(EXTRAS)]'
	{ echo "# Exact versions for \`make test\` / \`make demo\`. Regenerate with \`make lock\` (see README)."; \
	  .lockenv/bin/python -m pip freeze --all --exclude visionpe --exclude pip; } > $(LOCK)
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .pytest_cache .compat .lockenv
