# Prometheus from Debian's package, for hosts that cannot pull prom/prometheus (compose takes the
# image from PEFSIM_PROMETHEUS_IMAGE). Same entrypoint as the upstream image, so the compose
# command works with either.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
