# The two set-up commands: `make figures` and `make test`. Both create .venv if missing
# and install the package (editable) through constraints.txt, which pins the CPU torch.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST := MPLBACKEND=Agg HYPOTHESIS_PROFILE=ci $(PY) -m pytest -n auto -p no:cacheprovider

.PHONY: figures test test-slow install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

figures: $(STAMP)
	MPLBACKEND=Agg $(PY) -m paper_figures all --quick

test: $(STAMP)
	$(PYTEST) -m "not slow and not gpu" --doctest-modules tests dynamics experiments analyses

test-slow: $(STAMP)
	$(PYTEST) -m "slow and not gpu"

bench: $(STAMP)
	# the *_device.py benchmarks need a GPU and their arguments: benchmarks/gpu_checks.sh runs them
	for f in benchmarks/bench_*.py; do case $$f in *_device.py) continue;; esac; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) figures store .hypothesis
