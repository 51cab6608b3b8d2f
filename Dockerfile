# StructLoRA-VLM: the `structlora` CLI in a container.
#   docker build -t structlora-vlm .
#   docker run --rm -v $PWD/runs:/work/runs structlora-vlm run configs/tiny.yaml
#   GPU: base the image on a CUDA runtime (e.g. --build-arg BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime)
#        and run with --gpus all. Models and data are mounted, never baked in:
#   docker run --gpus all -v /models:/models -v /data:/data -v $PWD/runs:/work/runs structlora-vlm \
#     run configs/llava15_7b_coco.yaml --set model.name_or_path=/models/llava-1.5-7b-hf
#   demo: docker run -p 7860:7860 -v $PWD/runs:/work/runs structlora-vlm demo /work/runs/tiny/merge/model --host 0.0.0.0
ARG BASE=python:3.11-slim
FROM ${BASE}

# pycocoevalcap's PTB tokenizer and METEOR need a Java runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends default-jre-headless make \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/work/.cache/huggingface

RUN useradd --create-home --uid 1000 structlora
WORKDIR /work

# dependencies first (cached layer), then the code
COPY pyproject.toml README.md ./
COPY structlora ./structlora
COPY pipeline ./pipeline
COPY data ./data
COPY eval ./eval
COPY app ./app
RUN python -m pip install --upgrade pip \
    && python -m pip install "torch>=2.4" "torchvision>=0.19" \
    && python -m pip install .
COPY configs ./configs

RUN mkdir -p /work/runs /work/.cache && chown -R structlora:structlora /work
USER structlora
VOLUME ["/work/runs"]
EXPOSE 7860
ENTRYPOINT ["structlora"]
CMD ["--help"]
