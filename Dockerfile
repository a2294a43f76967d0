# CUDA PyTorch base; the trainer and the tested versions of everything else (constraints.txt) on top.
# Build and run:
#   docker build -t trainer .
#   docker run --gpus all -v $PWD/runs:/app/runs -v ~/.cache/huggingface:/root/.cache/huggingface \
#       trainer configs/gptj.yaml data.train_file=/app/runs/my-train.jsonl
# The base image's torch must be the version constraints.txt pins (torch==2.13.0; its CUDA 13.0 build
# here): pip keeps it because 2.13.0+cu130 satisfies the pin. Another base (--build-arg
# BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime for pre-Turing GPUs) must carry the same
# torch version, or pip stops with a conflict.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /app
# The image's Python is this one application's: let pip install into it even where the base marks
# it externally managed (PEP 668).
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/root/.cache/huggingface \
    PIP_BREAK_SYSTEM_PACKAGES=1

# Dependencies first, so code changes do not reinstall them: GPU (bitsandbytes), serving and
# tracking extras, every package at its tested version.
COPY pyproject.toml README.md constraints.txt ./
COPY trainer/__init__.py trainer/__init__.py
RUN pip install --no-cache-dir -c constraints.txt -e ".[gpu,serve,tracking]"

COPY trainer/ trainer/
COPY configs/ configs/
COPY scripts/ scripts/
COPY examples/ examples/

ENTRYPOINT ["accelerate", "launch", "trainer/train.py"]
CMD ["configs/gptj.yaml"]
