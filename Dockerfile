# CXR AI node. Runs the same entry point as `make run`: `dicom-node serve --config ...`.
# Build:  docker build -t cxr-ai-node .
# Run:    docker run -p 11112:11112 -p 8080:8080 -v cxr-data:/data cxr-ai-node
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    CXR_NODE__STORAGE__DATA_DIR=/data \
    CXR_NODE__DICOM__HOST=0.0.0.0 \
    CXR_NODE__WEB__HOST=0.0.0.0

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
 && python -c "import dicom_node, ai, training"

USER cxr
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz',timeout=4).status==200 else 1)"
ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "config/node.yaml"]
