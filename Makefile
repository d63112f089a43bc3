# custom_bn: `make demo` (main job) and `make test` (everything CI checks).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.14.1
PY_PACKAGES := torch==$(TORCH_VERSION) pytest hypothesis numpy ninja scikit-learn tqdm matplotlib expecttest
DEBIAN_PACKAGES := libgtest-dev cmake ninja-build
SETUP_STAMP := $(VENV)/.custom_bn-setup-$(TORCH_VERSION)
CMAKE_BUILD := build/cmake
CMAKE_INSTALL := build/install
export MAX_JOBS ?= $(shell nproc)
export PYTHONPATH := $(CURDIR)/python
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# torch finds CUDA through `which nvcc`, which may be a wrapper script outside the toolkit.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(firstword $(wildcard /usr/local/cuda/bin/nvcc)))
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

.PHONY: setup build build-python build-cmake test test-cpp test-python demo clean

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
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DCMAKE_INSTALL_PREFIX=$(CURDIR)/$(CMAKE_INSTALL)
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	cmake --install $(CMAKE_BUILD) > /dev/null

test-cpp: build-cmake
	cd $(CMAKE_BUILD) && ctest --output-on-failure

test-python: build-python
	$(PY) -m pytest tests/python -q

test: test-cpp test-python

demo: build-python
	$(PY) examples/train_digits.py

clean:
	rm -rf build python/custom_bn/*.so
