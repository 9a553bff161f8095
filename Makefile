# Every target creates .venv on first use; the stamp file makes later runs skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench mutants gpu-check clean constraints

# Installs the versions the suite was last run with (constraints.txt); pyproject.toml keeps
# ranges, so twinlm installed elsewhere still resolves. `make constraints` refreshes the file.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU wheel on this machine's disk; an unpinned
	# torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -c constraints.txt torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/twinlm demo --out reports/demo --explain reports/explain

# One pytest-xdist worker per logical core, at most 4 (each holds its own torch and JAX, up to
# 4.4 GB peak RSS measured); TEST_WORKERS=0 runs in one process. Files stay whole on a worker
# (--dist loadfile) so a module's fixtures and compiled programs are built once.
TEST_WORKERS ?= logical
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile tests

bench: $(STAMP)
	$(PY) -m parity.bench

# Re-resolve the newest releases within pyproject's ranges (torch still pinned) into
# constraints.txt, in a fresh throwaway venv so nothing installed by hand is recorded.
# Run `make clean test` on the result before committing it.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q torch==2.13.0
	.venv-constraints/bin/python -m pip install -q -e '.[test]'
	.venv-constraints/bin/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' > constraints.txt
	rm -rf .venv-constraints

# Plant each bug of tests/mutation/mutants.py in a temporary copy and run the suite against it
# (CI profile, -x, the mutant's guard tests first); exit 0 only when every mutant is caught.
# Not part of `make test`: one suite run per uncaught mutant. ARGS passes options (e.g. ARGS=--check).
mutants: $(STAMP)
	$(PY) -m tests.mutation $(ARGS)

# Both twins on one GPU, every family and head, float32 and bfloat16, then `pytest -m gpu`; one
# summary table, under 4 minutes. Needs a CUDA build of torch and jax[cuda12] in the venv
# (`pip install -e '.[gpu]'` plus torch from https://download.pytorch.org/whl/cu126); without
# a GPU it says so and runs the same checks on the CPU. ARGS passes options, e.g.
# ARGS="--dtypes float32 --matmul-precisions tf32,bf16x3" for the reduced-matmul rows.
gpu-check: $(STAMP)
	$(PY) -m parity.check.gpu $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
