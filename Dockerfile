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
USER gateway
ENV NOPS_GATEWAY__SERVER__HOST=0.0.0.0 \
    NOPS_GATEWAY__POLICY__OPA_BINARY=/usr/local/bin/opa
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "config/gateway.toml"]
