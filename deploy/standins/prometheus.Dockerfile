# A stand-in for prom/prometheus, from Debian's prometheus (2.42), for hosts that reach no image
# registry (deploy/build-images.sh builds it). The same layout as the upstream image:
# /bin/prometheus as entrypoint, /etc/prometheus/prometheus.yml, the TSDB in /prometheus owned by
# nobody, and busybox's `wget` for the healthcheck, as upstream.
ARG DEBIAN_IMAGE=skipfleet-standin/debian:bookworm

# Debian's package depends on the JavaScript libraries of its web console (over 400 MB, most of
# it moment-timezone's data); the server, its API and promtool need none of it.
FROM ${DEBIAN_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus busybox

FROM ${DEBIAN_IMAGE}
COPY --from=build /usr/bin/prometheus /usr/bin/promtool /bin/busybox /bin/
COPY --from=build /etc/prometheus/ /etc/prometheus/
RUN ln -s /bin/busybox /usr/local/bin/wget \
 && install -d -o nobody -g nogroup /prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
