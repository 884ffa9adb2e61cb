# The MLflow tracking server of docker/compose.yaml: PostgreSQL backend store, S3 artifacts.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# the optional extra-CA step (see sklearn.Dockerfile)
COPY docker/extra-ca/ /usr/local/share/ca-certificates/
RUN if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1 && command -v update-ca-certificates >/dev/null; \
    then update-ca-certificates >/dev/null; fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow \
    && pip install --quiet "mlflow>=3.1,<4" "psycopg2-binary>=2.9" "boto3>=1.28"

USER 10001:10001
WORKDIR /tmp
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
