# The broker image docker-compose.yml runs: Eclipse's mosquitto 2 by default. Where no image
# registry answers, deploy/build-images.sh passes MOSQUITTO_IMAGE=a stand-in built from Debian's
# mosquitto (deploy/standins/mosquitto.Dockerfile), with the same paths and user.
# The configuration is not baked in: compose mounts deploy/mosquitto/ and the password secret.
ARG MOSQUITTO_IMAGE=eclipse-mosquitto:2
FROM ${MOSQUITTO_IMAGE}
LABEL org.opencontainers.image.title="skipfleet-mosquitto"
# Non-root from the first process on. Eclipse's entrypoint only chowns /mosquitto when it runs as
# root; both images make /mosquitto/data this user's, so a fresh named volume is too.
USER 1883:1883
