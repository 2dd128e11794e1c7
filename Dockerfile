# The one dldkd image: Ray head/workers, RayJob submitter and MLflow server (k8s/README.md).
#   CPU:  docker build -t ghcr.io/dldkd/dldkd:0.1.0 .
#   GPU:  docker build -t ghcr.io/dldkd/dldkd:0.1.0-cuda \
#           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# torch/torchvision come from the PyTorch wheel index first, so pip does not resolve PyPI's
# default build (a CUDA build, which the CPU image does not want).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# wget: KubeRay's default readiness/liveness probes call it inside Ray containers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /bin/bash ray

WORKDIR /app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0 torchvision==0.28.0

COPY setup.cfg pyproject.toml README.md constraints.txt ./
COPY trainer ./trainer
COPY sharding ./sharding
COPY launch ./launch
COPY bench ./bench
COPY configs ./configs
# The MLflow server's Postgres driver rides along (s3fs and boto3 are dldkd dependencies).
# constraints.txt pins every indirect dependency to the set the tests ran with (its torch pin
# accepts the +cuXXX build installed above).
RUN pip install --no-cache-dir -c constraints.txt . psycopg2-binary==2.9.13

USER 1000
ENV HOME=/home/ray
