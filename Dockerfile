# The zapkeep daemon as a container image (any host that runs containers; Railway builds with
# Railpack, as railway.toml says, but would build this file if its builder were switched to it:
# hence no VOLUME, which Railway's Dockerfile builder refuses). Build: docker build -t zapkeep .
FROM python:3.11-slim-bookworm

# neonize imports python-magic, which loads the system's libmagic at import time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmagic1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY bot ./bot
COPY session_api ./session_api
COPY database.py ./
COPY storage ./storage

# Not root; the sessions' local files live in /data: mount a volume there (compose.yaml does; on
# Railway, a Railway Volume): the database holds the real copy, so a lost /data costs a restore.
RUN useradd --system --uid 10001 --user-group --home-dir /data zapkeep \
    && mkdir -p /data && chown zapkeep:zapkeep /data && chmod 700 /data
ENV DATA_DIR=/data \
    PORT=8080 \
    PYTHONUNBUFFERED=1
USER zapkeep
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]

# Exec form: the signal reaches Python, which stores the last changes and releases the lease
# (give it the time: docker stop -t 30, or stop_grace_period in compose.yaml).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "bot"]
CMD ["run"]
