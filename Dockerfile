# nvlm-serve: the OpenAI-compatible NVLM-D server on a CUDA PyTorch base.
# Build:  docker build -t nvlm-serve .
# Run:    docker run --gpus all -p 8000:8000 -v /models/NVLM-D-72B:/models/nvlm:ro nvlm-serve
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NVLM_MODEL=/models/nvlm

WORKDIR /opt/nvlm
COPY pyproject.toml README.md ./
COPY nvlm_engine ./nvlm_engine
COPY nvlm_langchain ./nvlm_langchain
COPY nvlm_server ./nvlm_server
# torch comes from the base image; the package brings the rest (server extras included).
# DL3013 asks to pin versions: this installs the project itself, whose pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[server]" \
    && useradd --create-home --uid 10001 nvlm

USER 10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["nvlm-serve", "--host", "0.0.0.0", "--port", "8000"]
