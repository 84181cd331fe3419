# syntax=docker/dockerfile:1
# One image for every role of Parley: `parley protocol|worker|migrate|drain|manage …` (bin/parley)
# and the operator (`python -m parley_operator`). Runs as a numeric non-root user under a
# read-only root filesystem: the only writable path it needs is /tmp (an emptyDir in the chart).
#
#   docker build -t parley:dev .
#   docker build --build-arg BASE_DIGEST=@sha256:<digest> -t parley:1.0 .   # pin the base by digest
ARG PYTHON_VERSION=3.11.14
ARG BASE_DIGEST=""

FROM python:${PYTHON_VERSION}-slim-bookworm${BASE_DIGEST} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/parley
# Dependencies first (a layer that changes only with the pins): wheels only, nothing compiled.
COPY requirements.txt ./requirements.txt
COPY operator/requirements.txt ./operator/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r requirements.txt -r operator/requirements.txt
COPY app/ ./app/
COPY bin/ ./bin/
COPY operator/parley_operator/ ./operator/parley_operator/
# Static files collected at build time (the root filesystem is read-only at run time), and
# bytecode compiled now, since nothing may write __pycache__ later. The key only lets settings load.
WORKDIR /opt/parley/app
RUN SECRET_KEY=collectstatic-build-only DATABASE_URL=sqlite:////tmp/build.sqlite3 /opt/venv/bin/python manage.py collectstatic --noinput --verbosity 0 \
 && /opt/venv/bin/python -m compileall -q /opt/parley/app /opt/parley/operator /opt/venv/lib \
 && chmod 0755 /opt/parley/bin/parley

FROM python:${PYTHON_VERSION}-slim-bookworm${BASE_DIGEST}
LABEL org.opencontainers.image.title="parley" \
      org.opencontainers.image.description="Parley chat platform: protocol, worker, migrate and operator roles" \
      org.opencontainers.image.source="https://github.com/parley/parley"
ENV PATH=/opt/parley/bin:/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    PARLEY_APP_DIR=/opt/parley/app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/parley /opt/parley
WORKDIR /opt/parley/app
# Numeric, so that runAsNonRoot can be verified without a passwd entry; owns nothing in the image.
USER 10001:10001
EXPOSE 8000 9100
# Kubernetes probes /healthz and /readyz itself; a worker serves no HTTP on 8000, so no HEALTHCHECK.
ENTRYPOINT ["parley"]
CMD ["protocol"]
