# StructLoRA-VLM: the `structlora` CLI in a container. One image for CPU and GPU hosts.
#   docker build -t structlora-vlm .
#   docker run --rm --user $(id -u):$(id -g) -v $PWD/runs:/work/runs structlora-vlm run configs/tiny.yaml
#   --user: run as the owner of the mounted runs/ folder (the image runs under any uid; without --user it runs as
#   its own user `structlora`, uid 1000, which must be able to write the folder: a clear error says so if not).
#   GPU: the default torch (pinned as the Makefile pins it) is PyPI's Linux build, which carries its CUDA runtime:
#        run with --gpus all. Or keep a CUDA base image's own torch:
#        --build-arg BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime --build-arg TORCH=
#   Models and data are mounted, never baked in:
#   docker run --gpus all --user $(id -u):$(id -g) -v /models:/models -v /data:/data -v $PWD/runs:/work/runs \
#     structlora-vlm run configs/llava15_7b_coco.yaml --set model.name_or_path=/models/llava-1.5-7b-hf
#   demo: docker run -p 7860:7860 -v $PWD/runs:/work/runs structlora-vlm demo /work/runs/tiny/merge/model --host 0.0.0.0
#   A pip mirror for the build only (not kept in the image's environment; no credentials in these):
#   --build-arg PIP_INDEX_URL=... / PIP_EXTRA_INDEX_URL=... / PIP_FIND_LINKS=...
#   Checked end to end (build, run, eval, demo as the image's user): scripts/container_check.sh (README, "Container").
ARG BASE=python:3.11-slim
FROM ${BASE}

# pycocoevalcap's PTB tokenizer and METEOR need a Java runtime; tini as PID 1 passes `docker stop`'s SIGTERM on
# (Python as PID 1 ignores it) and reaps the processes that data loaders and launchers leave
RUN apt-get update \
    && apt-get install -y --no-install-recommends default-jre-headless make tini \
    && rm -rf /var/lib/apt/lists/*

# Every cache under /work/.cache, writable by any uid (docker run --user), so that nothing needs a home folder.
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/work/.cache/huggingface \
    XDG_CACHE_HOME=/work/.cache \
    MPLCONFIGDIR=/work/.cache/matplotlib \
    STRUCTLORA_CONTAINER=1

RUN useradd --create-home --uid 1000 structlora
WORKDIR /work

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
# torch first, in its own layer (code changes do not reinstall it); TORCH= (empty) keeps the base image's torch
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
RUN python -m pip install --upgrade pip \
    && if [ -n "$TORCH" ]; then python -m pip install $TORCH; fi

# then the package and its other dependencies
COPY pyproject.toml README.md ./
COPY structlora ./structlora
COPY pipeline ./pipeline
COPY data ./data
COPY eval ./eval
COPY app ./app
RUN python -m pip install . && rm -rf build *.egg-info
COPY configs ./configs

# runs/ (the volume) and the caches: the image's user owns them, and any other uid may write them (sticky, as /tmp)
RUN mkdir -p /work/runs /work/.cache && chown -R structlora:structlora /work \
    && chmod 1777 /work/runs /work/.cache
USER structlora
VOLUME ["/work/runs"]
EXPOSE 7860
ENTRYPOINT ["tini", "--", "structlora"]
CMD ["--help"]
