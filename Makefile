# cerebseg: the two set-up commands of the README.
#   make demo   install, build the atlas library from ../shared/data, segment sub-ixi002
#   make test   install, run the test suite (unit + workflow graphs + one real subject)
PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared/data
ASSETS ?= .assets
PIP = $(VENV)/bin/pip
# one pytest worker per CPU, each pinned to its CPU, a test file per worker at a time (its module
# fixtures run once), the files that run whole participants first (tests/conftest.py)
PYTEST_ARGS ?= --durations=30 -n logical --dist loadfile --no-loadscope-reorder
export NIPYPE_NO_ET = 1

.PHONY: install assets demo test clean

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel cython
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(ASSETS)/manifest.json: $(VENV)/.installed
	$(VENV)/bin/cerebseg-assets build --sources $(SHARED) --out $(ASSETS)

# assets built by an older cerebseg may lack a library the default now needs: build again
assets: $(ASSETS)/manifest.json
	@$(VENV)/bin/python -c "import json, sys; from cerebseg.assets import DEFAULT_BUILD; \
	    libs = json.load(open('$(ASSETS)/manifest.json'))['libraries']; \
	    sys.exit(not set(DEFAULT_BUILD) <= set(libs))" || \
	    $(VENV)/bin/cerebseg-assets build --sources $(SHARED) --out $(ASSETS)

demo: assets
	$(VENV)/bin/cerebseg $(SHARED)/bids/multimodal demo_out participant \
	    --participant-label ixi002 --assets-dir $(ASSETS) -w work/demo
	$(VENV)/bin/cerebseg $(SHARED)/bids/multimodal demo_out group
	@echo "Outputs in demo_out/ (labels, volumes: demo_out/sub-ixi002/anat/)"

test: install
	CEREBSEG_SHARED_DATA=$(SHARED) $(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(ASSETS) demo_out work .pytest_cache
