# A stand-in for eclipse-mosquitto:2, from Debian's mosquitto 2.0, for hosts that reach no image
# registry (deploy/build-images.sh builds it). The same layout as Eclipse's image: user mosquitto
# with uid/gid 1883, /mosquitto/config, /mosquitto/data (owned by it, so a fresh named volume is
# too) and /mosquitto/log, mosquitto_sub for the healthcheck, and the broker run on
# /mosquitto/config/mosquitto.conf.
ARG DEBIAN_IMAGE=skipfleet-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
# The user exists before the package, so Debian's postinst keeps Eclipse's ids.
RUN groupadd --system --gid 1883 mosquitto \
 && useradd --system --uid 1883 --gid mosquitto --no-create-home --home-dir /mosquitto/data \
      --shell /usr/sbin/nologin mosquitto \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o mosquitto -g mosquitto /mosquitto/config /mosquitto/data /mosquitto/log \
 && printf 'listener 1883\nallow_anonymous false\npersistence true\npersistence_location /mosquitto/data/\n' \
      >/mosquitto/config/mosquitto.conf
EXPOSE 1883
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
