# A model family's trial image (runner=docker); one Dockerfile for every family:
#   FAMILY=sklearn EXTRAS=proxy        -> mlops-tune-sklearn: scikit-learn, no TensorFlow
#   FAMILY=keras   EXTRAS=keras,proxy  -> mlops-tune-keras: TensorFlow (CPU) for ann, cnn
# Build with `make images` (docker/build-images.sh); the context is the repository root.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG FAMILY=sklearn
# pyproject.toml extras installed besides the core; [proxy] = grpcio, for the study's Optuna storage proxy
ARG EXTRAS=proxy

# Optional extra CA certificates (PEM files named *.crt in docker/extra-ca/) for networks
# whose proxy intercepts TLS: pip in the next steps trusts them. build-images.sh copies the
# host's /usr/local/share/ca-certificates there; an empty folder changes nothing.
COPY docker/extra-ca/ /usr/local/share/ca-certificates/
RUN if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1 && command -v update-ca-certificates >/dev/null; \
    then update-ca-certificates >/dev/null; fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    GIT_PYTHON_REFRESH=quiet \
    MPLCONFIGDIR=/opt/mplconfig \
    MLOPS_TUNE_IMAGE_FAMILY=${FAMILY}

RUN python3 -m venv /opt/venv
# trials run as an unprivileged user (see USER below); /tmp is the only place they write
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlops
# dependencies first, from pyproject.toml alone (a stub package), so that a code change
# rebuilds only the last layers; TensorFlow is in the image exactly when EXTRAS asks for keras
COPY pyproject.toml /opt/mlops-tune/
RUN mkdir /opt/mlops-tune/mlops_tune && touch /opt/mlops-tune/mlops_tune/__init__.py /opt/mlops-tune/README.md \
    && pip install --quiet "/opt/mlops-tune[${EXTRAS}]" && pip uninstall --quiet --yes mlops-tune \
    && python -c "import importlib.util as u, sys; \
sys.exit((u.find_spec('tensorflow') is not None) != ('keras' in '${EXTRAS}'.split(',')))"
# matplotlib's font cache, built once here instead of in every trial container
RUN mkdir -p /opt/mplconfig && python -c "import matplotlib.font_manager" && chown -R 10001:10001 /opt/mplconfig
COPY README.md /opt/mlops-tune/
COPY mlops_tune /opt/mlops-tune/mlops_tune
RUN pip install --quiet --no-deps --no-build-isolation /opt/mlops-tune 2>/dev/null \
    || pip install --quiet --no-deps /opt/mlops-tune

USER 10001:10001
WORKDIR /tmp
CMD ["python", "-m", "mlops_tune.worker"]
