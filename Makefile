# custom_bn: `make demo` (main job), `make test` (everything CI checks), `make bench` (CPU timings).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.14.1
PY_PACKAGES := torch==$(TORCH_VERSION) pytest hypothesis numpy ninja scikit-learn tqdm matplotlib expecttest \
  onnx onnxscript onnxruntime torchvision==0.29.1 timm==1.0.31
DEBIAN_PACKAGES := libgtest-dev cmake ninja-build
# Named after the package list, so a change to it installs again.
SETUP_STAMP := $(VENV)/.custom_bn-setup-$(shell echo '$(PY_PACKAGES)' | md5sum | cut -c1-8)
CMAKE_BUILD := build/cmake
CMAKE_INSTALL := build/install
export MAX_JOBS ?= $(shell nproc)
export PYTHONPATH := $(CURDIR)/python
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# CMake's torch config finds CUDA through `which nvcc`, which may be a wrapper script outside the
# toolkit: the CMake configure step gets CUDA_HOME. (setup.py finds the toolkit on its own, so
# `make` and `pip install` build the Python extension with the same flags.)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(firstword $(wildcard /usr/local/cuda/bin/nvcc)))

.PHONY: setup build build-python build-cmake test test-cpp test-python test-install test-large test-sanitize mutation mutation-python demo bench bench-cpp clean

setup: $(SETUP_STAMP)
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq $(DEBIAN_PACKAGES); }

$(SETUP_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PY_PACKAGES)
	touch $@

build: build-python build-cmake

# In-place build of custom_bn._C (ninja keeps it incremental); PYTHONPATH points at python/.
build-python: setup
	$(PY) setup.py -q build_ext --inplace

build-cmake: setup
	$(if $(CUDA_HOME),CUDA_HOME=$(CUDA_HOME)) cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DCMAKE_INSTALL_PREFIX=$(CURDIR)/$(CMAKE_INSTALL) -DCUSTOM_BN_PYTHON=$(CURDIR)/$(PY)
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	cmake --install $(CMAKE_BUILD) > /dev/null

test-cpp: build-cmake build-python  # the deployment tests write their models from Python
	cd $(CMAKE_BUILD) && ctest --output-on-failure

test-python: build-python
	$(PY) -m pytest tests/python -q

# pip installs as a user runs them, outside make's environment: a plain install into a target
# folder and an editable one, each smoke-tested from outside the source tree. They reuse the
# objects of build-python (same flags), so they take seconds after it.
PIP_TARGET := build/pip-target
PIP_EDITABLE := build/pip-editable
test-install: build-python
	rm -rf $(PIP_TARGET) $(PIP_EDITABLE)
	env -u CUDA_HOME -u PYTHONPATH $(PY) -m pip install -q --disable-pip-version-check \
	  --no-build-isolation --no-deps --target $(PIP_TARGET) .
	cd /tmp && env -u PYTHONPATH PYTHONPATH=$(CURDIR)/$(PIP_TARGET) \
	  $(CURDIR)/$(PY) $(CURDIR)/tests/install/smoke.py $(CURDIR)/$(PIP_TARGET)
	env -u CUDA_HOME -u PYTHONPATH $(PY) -m pip install -q --disable-pip-version-check \
	  --no-build-isolation --no-deps --prefix $(PIP_EDITABLE) -e .
	cd /tmp && env -u PYTHONPATH $(CURDIR)/$(PY) -c "import site, sys; \
	  site.addsitedir(sys.argv[1]); sys.argv[1:] = ['$(CURDIR)/python']; \
	  exec(open('$(CURDIR)/tests/install/smoke.py').read())" \
	  $(CURDIR)/$(PIP_EDITABLE)/lib/python3*/site-packages

test: test-cpp test-python test-install

# Opt-in, not in `make test`: an input of more than 2**31 elements (~18 GB of memory, ~5 minutes).
test-large: build-python
	$(PY) -m pytest tests/large -q

# libcustom_bn and its C++ tests (CPU kernels and the emulated CUDA kernels) under AddressSanitizer
# and UndefinedBehaviorSanitizer, in a CPU-only build of its own (cmake/Sanitize.cmake); libtorch
# is not instrumented. LeakSanitizer stays on, with tests/sanitize/lsan.supp for torch's own
# leaks. Stack use-after-return detection stays off: it would give each of the emulator's
# thousands of fibers a fake stack (measured: 4x the memory, 2x the time). installed_package_example
# is left out: it tests packaging rather than code, and its separately built program would load the
# instrumented library without the ASan runtime.
SANITIZE_BUILD := build/sanitize
SANITIZE_ENV := \
  ASAN_OPTIONS=detect_leaks=1:check_initialization_order=1:strict_init_order=1:strict_string_checks=1 \
  LSAN_OPTIONS=suppressions=$(CURDIR)/tests/sanitize/lsan.supp \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
test-sanitize: setup
	cmake -S . -B $(SANITIZE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWITH_CUDA=OFF \
	  -DCUSTOM_BN_SANITIZE=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(SANITIZE_BUILD) -j $(MAX_JOBS)
	cd $(SANITIZE_BUILD) && $(SANITIZE_ENV) ctest --output-on-failure -E '^installed_package_example$$'

# On demand, not in `make test` (~30 min): each deliberate bug of tests/mutation/mutants.py is
# applied to a scratch copy of the tree (/tmp/custom_bn-mutation), rebuilt and tested; fails if
# any survives. MUTANTS=id1 id2 ... runs only those.
mutation: setup
	nice $(PY) tests/mutation/run.py $(MUTANTS)

# On demand, not in `make test`: mutmut over the Python package (tests/mutation/run_python.py
# stages python/custom_bn as src/custom_bn in $TMPDIR/custom_bn-mutmut and runs mutmut there);
# FILES=convert.py ... limits it to those modules.
mutation-python: build-python
	$(PY) -m pip install -q --disable-pip-version-check mutmut==3.8.1
	nice $(PY) tests/mutation/run_python.py $(FILES)

demo: build-python
	$(PY) examples/train_digits.py

# Not part of `make test`: timings belong here, never in unit tests. About 5-10 minutes.
bench: build-python
	$(PY) benchmarks/bench.py

# C++ Google Benchmark of custom_bn:: against ATen (a CPU-only build of its own, apart from
# build/cmake). BENCH_THREADS sets at::set_num_threads; BENCH_ARGS go to the binary.
BENCH_BUILD := build/bench
BENCH_THREADS ?= 2
BENCH_ARGS ?= --benchmark_min_time=0.2
bench-cpp: setup
	@dpkg -s libbenchmark-dev >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq libbenchmark-dev; }
	cmake -S . -B $(BENCH_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DWITH_CUDA=OFF \
	  -DBUILD_TESTING=OFF -DCUSTOM_BN_BUILD_BENCHMARKS=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(BENCH_BUILD) --target custom_bn_bench -j $(MAX_JOBS)
	CUSTOM_BN_BENCH_THREADS=$(BENCH_THREADS) $(BENCH_BUILD)/benchmarks/cpp/custom_bn_bench $(BENCH_ARGS)

clean:
	rm -rf build python/custom_bn/*.so
