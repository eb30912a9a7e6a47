# CXR AI node. Runs the same entry point as `make run`: `dicom-node serve --config ...`.
# Build:  docker build -t cxr-ai-node .
#         (ports: --build-arg DICOM_PORT=104 --build-arg WEB_PORT=8080)
# Run:    docker run -p 11112:11112 -p 127.0.0.1:8080:8080 -v cxr-data:/data cxr-ai-node
#
# Only the ports the configuration uses are exposed: the DICOM listener (dicom.port) and the
# web API/dashboard (web.port), both set from the build args below so the image and its
# configuration agree. Publish the web port on the host's loopback and put a TLS reverse
# proxy in front of it (README: "the web UI behind TLS"); never publish it bare on a
# hospital network.
# DICOM TLS is opt-in: enable dicom.tls (certificates mounted read-only, e.g.
# -v /etc/cxr-tls:/tls:ro -e CXR_NODE__DICOM__TLS__ENABLED=true
# -e CXR_NODE__DICOM__TLS__CERT_FILE=/tls/node.pem ...) and publish its port yourself
# (-p 2762:2762); the image does not expose it by default.
FROM python:3.11-slim-bookworm

ARG DICOM_PORT=11112
ARG WEB_PORT=8080

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    CXR_NODE__STORAGE__DATA_DIR=/data \
    CXR_NODE__DICOM__HOST=0.0.0.0 \
    CXR_NODE__DICOM__PORT=${DICOM_PORT} \
    CXR_NODE__WEB__HOST=0.0.0.0 \
    CXR_NODE__WEB__PORT=${WEB_PORT}

# dcmtk: echoscu/storescu for operators inside the container; no compilers needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 cxr && mkdir -p /data && chown cxr /data
WORKDIR /app

# Dependencies first (cached layer), pinned by the same constraints file as `make`.
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml setup.py README.md ./
COPY ai ai
COPY dicom_node dicom_node
COPY training training
COPY config config
RUN pip install -c requirements/constraints.txt . \
 && python -c "import dicom_node, ai, training, waitress"

USER cxr
VOLUME ["/data"]
EXPOSE ${DICOM_PORT} ${WEB_PORT}
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD python -c "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['CXR_NODE__WEB__PORT'], timeout=4).status == 200 else 1)"
ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "config/node.yaml"]
