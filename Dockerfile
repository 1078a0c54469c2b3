# One image, three entry points: `serve` (API), `worker`, `migrate`.
#   docker build -t tlsoverride .
#   docker run --rm -e TLSO_DATABASE_URL=... tlsoverride migrate
#   docker run -p 8000:8000 -e TLSO_... tlsoverride serve
#   docker run -e TLSO_... tlsoverride worker
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install .

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TLSO_ENV=production \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN groupadd --system --gid 10001 tlso \
    && useradd --system --uid 10001 --gid tlso --home /var/lib/tlsoverride --shell /usr/sbin/nologin tlso
COPY --from=build /opt/venv /opt/venv
# Only the installed package runs: the migrations ship inside it (app/migrations), so the working
# directory holds no source that could shadow it.
WORKDIR /var/lib/tlsoverride
RUN mkdir -p /tmp/prometheus && chown tlso:tlso /tmp/prometheus /var/lib/tlsoverride
USER 10001:10001
EXPOSE 8000
# Probes: GET /healthz (alive) and /readyz (database reachable, schema at head) on the API.
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve"]
