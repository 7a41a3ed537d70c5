# acqd as a service. Build: docker build -t acqd .
# Run (drivers on the host network, data on a volume):
#   docker run --network host -v /data/acqd:/data -v $PWD/configs:/configs acqd serve --config /configs/rig.yaml --data-root /data
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/acqd
COPY pyproject.toml README.md ./
COPY acqd ./acqd
COPY configs ./configs
RUN pip install --no-cache-dir .

# SIGTERM closes every stream file cleanly; give the writers time to flush.
STOPSIGNAL SIGTERM
EXPOSE 8600
VOLUME ["/data"]
ENTRYPOINT ["acqd"]
CMD ["serve", "--config", "/opt/acqd/configs/rig.yaml", "--data-root", "/data"]
