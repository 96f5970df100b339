# The device agent image: the skipfleet package with its three dependencies (NumPy, paho-mqtt,
# msgpack) and nothing else: no Ray, no Prometheus client. Small enough for a Raspberry Pi.
# Build for both architectures (from the repository root; push, or load one platform locally):
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f deploy/agent.Dockerfile -t REGISTRY/skipfleet-agent:TAG --push .
# arm64 is the Pi: it needs a 64-bit OS (NumPy publishes no armv7 wheels).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with the package installed from wheels --------------------------------
FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/skipfleet
WORKDIR /src
COPY --chmod=0755 deploy/pip-in-build.sh /usr/local/bin/
# Dependencies first, keyed on pyproject.toml alone. `.` without extras: NumPy, paho-mqtt and
# msgpack. --only-binary: never compile them (under QEMU that takes an hour and fails without a
# compiler); a missing wheel for the platform must fail the build instead. The pip cache and the
# host's index settings (secrets pip_cert, pip_conf) are mounted for the RUN, never in a layer.
COPY pyproject.toml ./
RUN --mount=type=cache,id=skipfleet-pip,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_conf \
    pip-in-build.sh dependencies "" --only-binary=numpy,msgpack,paho-mqtt
# The coordinator package is not copied at all: nothing in this image can import it.
COPY README.md ./
COPY shared/ shared/
COPY agent/ agent/
COPY skipfleet/ skipfleet/
RUN --mount=type=cache,id=skipfleet-pip,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_conf \
    pip-in-build.sh package

# --- runtime: the virtualenv, two scripts, a non-root user --------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="skipfleet-agent" \
      org.opencontainers.image.description="skipfleet device agent: on-device Skip2-LoRA fine-tuning over MQTT"
# /var/lib/skipfleet: a named volume with one state dir per device; a fresh volume takes this
# directory's owner. /run/skipfleet: the device's own MQTT password and the health file.
RUN groupadd --system --gid 10001 skipfleet \
 && useradd --system --uid 10001 --gid skipfleet --create-home --home-dir /home/skipfleet \
      --shell /usr/sbin/nologin skipfleet \
 && install -d -o skipfleet -g skipfleet -m 0750 /var/lib/skipfleet /run/skipfleet
COPY --from=build /opt/skipfleet /opt/skipfleet
COPY --chmod=0755 deploy/agent-entrypoint.sh deploy/agent-healthcheck.sh /usr/local/bin/
ENV PATH=/opt/skipfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SKIPFLEET_HEALTH_FILE=/run/skipfleet/health
USER 10001:10001
WORKDIR /home/skipfleet
ENTRYPOINT ["agent-entrypoint.sh"]
