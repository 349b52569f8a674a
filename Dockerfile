# syntax=docker/dockerfile:1
# Build stage: turn the project into a wheel (no build tools reach the final image), with the
# locked setuptools: nothing here is installed at a version the lock does not name.
FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY requirements/run.txt ./requirements/run.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/run.txt
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# Final stage: the locked dependencies (each checked against its hash), the project's wheel,
# a non-root user, the config.
FROM python:3.12-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
COPY requirements/run.txt /tmp/run.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --require-hashes -r /tmp/run.txt \
 && pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels /tmp/run.txt
COPY config.yaml /etc/proxy/config.yaml
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"]
ENTRYPOINT ["proxy"]
# Bound to 0.0.0.0, the bundled config.yaml (no `clients:`) is refused with a message saying
# how to add client keys: mount a closed config (deploy/config.yaml reads PROXY_CLIENT_KEY)
# or one with `server.open: true`. An open proxy on every interface is never the default.
CMD ["serve", "--config", "/etc/proxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
