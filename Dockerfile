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
RUN groupadd --system --gid 10001 tlso && useradd --system --uid 10001 --gid tlso --home /app --shell /usr/sbin/nologin tlso
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# Alembic migrations live beside the package (app/core/migrations.py finds them at /app/alembic).
COPY alembic.ini ./
COPY alembic ./alembic
COPY app ./app
RUN mkdir -p /tmp/prometheus && chown tlso:tlso /tmp/prometheus
USER 10001:10001
EXPOSE 8000
# Probes: GET /healthz (alive) and /readyz (database reachable, schema at head) on the API.
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve"]
