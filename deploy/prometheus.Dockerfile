# The Prometheus image docker-compose.yml runs: prom/prometheus by default. Where no image
# registry answers, deploy/build-images.sh passes PROMETHEUS_IMAGE=a stand-in built from Debian's
# prometheus (deploy/standins/prometheus.Dockerfile), with the same paths, user and entrypoint.
# The configuration is not baked in: compose mounts deploy/prometheus/prometheus.yml and the alert
# rules it loads, deploy/prometheus/alerts.yml, side by side in /etc/prometheus.
ARG PROMETHEUS_IMAGE=prom/prometheus:v2.53.2
FROM ${PROMETHEUS_IMAGE}
LABEL org.opencontainers.image.title="skipfleet-prometheus"
# nobody:nogroup, as upstream: it owns /prometheus (the TSDB volume) in both images.
USER 65534:65534
