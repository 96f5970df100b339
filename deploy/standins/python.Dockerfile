# A stand-in for python:3.11-slim-bookworm, from Debian's packages, for hosts that reach no image
# registry (deploy/build-images.sh builds it; deploy/README.md, "Images without a registry").
# What the skipfleet images need of their base: `python` 3.11 with venv and pip, bash, getent,
# groupadd/useradd. Debian's Python lives in /usr/bin rather than /usr/local/bin; nothing of ours
# names that path (the images run /opt/skipfleet/bin).
ARG DEBIAN_IMAGE=skipfleet-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
CMD ["python3"]
