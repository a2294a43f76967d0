# CUDA PyTorch base; the trainer installed on top. Build and run:
#   docker build -t trainer .
#   docker run --gpus all -v $PWD/runs:/app/runs -v ~/.cache/huggingface:/root/.cache/huggingface \
#       trainer configs/gptj.yaml data.train_file=/app/runs/my-train.jsonl
# Any CUDA build of PyTorch >= 2.4 works; override with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/root/.cache/huggingface

# Dependencies first, so code changes do not reinstall them. The base image's torch satisfies the
# package's torch range, so pip keeps it.
COPY pyproject.toml README.md ./
COPY trainer/__init__.py trainer/__init__.py
RUN pip install --no-cache-dir -e ".[gpu]"

COPY trainer/ trainer/
COPY configs/ configs/
COPY scripts/ scripts/
COPY examples/ examples/

ENTRYPOINT ["accelerate", "launch", "trainer/train.py"]
CMD ["configs/gptj.yaml"]
