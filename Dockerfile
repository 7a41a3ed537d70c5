# acqd as a service. Build: docker build -t acqd .
# Run (drivers on the host network, data on a volume; sealing finalized files needs CAP_LINUX_IMMUTABLE):
#   docker run --network host --cap-add LINUX_IMMUTABLE --stop-timeout 120 -v /data/acqd:/data \
#       -v $PWD/configs:/configs -e ACQD_CONFIG=/configs/rig.yaml acqd
# Settings come from the environment (ACQD_CONFIG, ACQD_HOST, ACQD_PORT, ACQD_TOKEN, ACQD_DATA_ROOT) or a Docker
# secret named acqd_token; see docs/control-api.md "Running it as a service".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    ACQD_CONFIG=/opt/acqd/configs/rig.yaml ACQD_DATA_ROOT=/data ACQD_PORT=8600
WORKDIR /opt/acqd

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir acqd && touch acqd/__init__.py && pip install --no-cache-dir . && pip uninstall -y acqd && rm -rf acqd build

COPY acqd ./acqd
COPY configs ./configs
COPY docs ./docs
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --home-dir /data acqd && mkdir -p /data && chown acqd /data

USER acqd
VOLUME ["/data"]
EXPOSE 8600
# SIGTERM closes the session and every stream file cleanly; give the writers time: docker's default stop timeout
# is 10 s, run with --stop-timeout 120 (compose: stop_grace_period: 120s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"ACQD_PORT\", \"8600\")}/healthz', timeout=4)"
ENTRYPOINT ["acqd"]
CMD ["serve"]
