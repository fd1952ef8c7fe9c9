# syntax=docker/dockerfile:1
# NOPS Gateway image: the gateway, its policies, and a pinned OPA built from
# source (the same pin as scripts/tools). The image runs as a non-root user.

FROM golang:1.26-bookworm AS opa
ARG OPA_VERSION=v1.22.2
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags "-s -w" \
        github.com/open-policy-agent/opa@${OPA_VERSION}

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /app gateway
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY egress ./egress
COPY registry ./registry
COPY bus ./bus
COPY audit ./audit
RUN pip install --no-cache-dir -c constraints.txt . && rm -rf /root/.cache
COPY policies ./policies
COPY config ./config
COPY --from=opa /out/opa /usr/local/bin/opa
# The audit data directory (chain id, signing key, file store, spool): the only
# place the gateway writes; mount a volume here to keep it across containers.
RUN mkdir -p /var/lib/nops/audit && chown -R gateway:gateway /var/lib/nops \
    && chmod 0750 /var/lib/nops/audit
USER gateway
ENV NOPS_GATEWAY__SERVER__HOST=0.0.0.0 \
    NOPS_GATEWAY__POLICY__OPA_BINARY=/usr/local/bin/opa \
    NOPS_GATEWAY__AUDIT__PATH=/var/lib/nops/audit/audit.jsonl \
    NOPS_GATEWAY__AUDIT__SPOOL_PATH=/var/lib/nops/audit/spool.jsonl
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "config/gateway.toml"]
