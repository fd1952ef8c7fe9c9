# syntax=docker/dockerfile:1
# NOPS Gateway image: the gateway, the registry, the bus, the demo echo
# upstream and the bundle service (one image, several entrypoints), the
# policies, and a pinned OPA built from source (the same pin as scripts/tools).
# It runs as a non-root user (uid 10001) and never needs to write outside
# /var/lib/nops (a volume) and /tmp.
#
# Base images are pinned to exact versions; the Go release matches the one
# scripts/tools builds OPA with in CI. Pin them by digest as well when you
# mirror them (image@sha256:...), so a re-pushed tag cannot change the build.
#
# The signed policy bundle is NOT built here: building it needs the signing
# (private) key, which must never reach an image layer. The one-shot `bundle`
# service (compose.yaml) or the bundle server's init container (deploy/k8s)
# builds and signs it at deploy time with scripts/build-bundle, which this
# image carries together with OPA.

FROM golang:1.26.8-bookworm AS opa
ARG OPA_VERSION=v1.22.2
RUN CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN=/out go install -trimpath -ldflags "-s -w" \
        github.com/open-policy-agent/opa@${OPA_VERSION}

# Python packages into a virtualenv, so the final stage gets no build leftovers.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/nops
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY egress ./egress
COPY registry ./registry
COPY bus ./bus
COPY audit ./audit
COPY problemjson ./problemjson
COPY secretfile ./secretfile
# With the 'embedded' extra (wasmtime), so [policy] engine = "embedded" works in
# the image too; it compiles the policy with the bundled opa into /tmp.
RUN /opt/nops/bin/pip install --no-cache-dir -c constraints.txt ".[embedded]" && rm -rf /root/.cache

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY --from=build /opt/nops /opt/nops
COPY --from=opa /out/opa /usr/local/bin/opa
COPY policies ./policies
COPY config ./config
COPY deploy/opa ./deploy/opa
COPY scripts/build-bundle ./scripts/build-bundle
# The audit data directory (chain id, signing key, file store, spool) and the
# bundle directory (the bundle service's output): the only places anything
# writes; mount volumes here to keep them across containers.
RUN mkdir -p /var/lib/nops/audit /var/lib/nops/bundles \
    && chown -R gateway:gateway /var/lib/nops \
    && chmod 0750 /var/lib/nops/audit
# Numeric, so Kubernetes can check runAsNonRoot without resolving a name.
USER 10001:10001
ENV PATH=/opt/nops/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    TOOLS_BIN=/usr/local/bin \
    NOPS_GATEWAY__SERVER__HOST=0.0.0.0 \
    NOPS_GATEWAY__POLICY__OPA_BINARY=/usr/local/bin/opa \
    NOPS_GATEWAY__AUDIT__PATH=/var/lib/nops/audit/audit.jsonl \
    NOPS_GATEWAY__AUDIT__SPOOL_PATH=/var/lib/nops/audit/spool.jsonl
# 8080: the gateway; 9090: its Prometheus metrics listener ([metrics]).
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "config/gateway.toml"]
