# The coordinator image: the skipfleet package with its `coordinator` extra (Ray, Prometheus
# client) and a Ray head node started by the entrypoint (deploy/coordinator-entrypoint.sh).
# Build for both architectures (from the repository root):
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f deploy/coordinator.Dockerfile -t REGISTRY/skipfleet-coordinator:TAG --push .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with the package and the coordinator extra, from wheels ---------------
FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/skipfleet
WORKDIR /src
COPY --chmod=0755 deploy/pip-in-build.sh /usr/local/bin/
# Dependencies first, keyed on pyproject.toml alone (deploy/pip-in-build.sh). Ray and NumPy ship
# wheels for linux/amd64 and linux/arm64; never fall back to compiling them.
COPY pyproject.toml ./
RUN --mount=type=cache,id=skipfleet-pip,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_conf \
    pip-in-build.sh dependencies coordinator --only-binary=ray,numpy,grpcio
COPY README.md ./
COPY shared/ shared/
COPY agent/ agent/
COPY coordinator/ coordinator/
COPY skipfleet/ skipfleet/
RUN --mount=type=cache,id=skipfleet-pip,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_conf \
    pip-in-build.sh package

# --- runtime: the virtualenv, the entrypoint, a non-root user -----------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="skipfleet-coordinator" \
      org.opencontainers.image.description="skipfleet coordinator: Ray scheduling, adapter aggregation, MQTT, Prometheus metrics"
# /var/lib/skipfleet: the coordinator's state (a named volume takes this directory's owner).
# Ray keeps its session files in /tmp/ray and its object store in /dev/shm (compose: shm_size).
RUN groupadd --system --gid 10001 skipfleet \
 && useradd --system --uid 10001 --gid skipfleet --create-home --home-dir /home/skipfleet \
      --shell /usr/sbin/nologin skipfleet \
 && install -d -o skipfleet -g skipfleet -m 0750 /var/lib/skipfleet
COPY --from=build /opt/skipfleet /opt/skipfleet
COPY --chmod=0755 deploy/coordinator-entrypoint.sh /usr/local/bin/
ENV PATH=/opt/skipfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0
# 8080 API (/health), 9464 Prometheus metrics, 6379 Ray GCS (for extra Ray nodes only).
EXPOSE 8080 9464 6379
USER 10001:10001
WORKDIR /home/skipfleet
ENTRYPOINT ["coordinator-entrypoint.sh"]
