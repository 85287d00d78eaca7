# coremq in a container: see tuning/container.md before running it.
#
#   docker build -t coremq .
#   docker run -d --name coremq --security-opt seccomp=coremq-seccomp.json \
#       --ulimit nofile=1048576:1048576 --ulimit memlock=-1 \
#       -p 1883:1883 -p 127.0.0.1:9183:9183 -v coremq-data:/var/lib/coremq coremq
#
# io_uring and seccomp: Docker's default seccomp profile refuses
# io_uring_setup/enter/register (since Docker 25, moby/moby#46762), and
# coremq needs them to start at all (glommio's executors are io_uring
# rings, whatever --io says). Run it with a profile that allows them —
# tuning/container.md shows how to make one from Docker's default — or, not
# recommended, --security-opt seccomp=unconfined.

# ---- build ----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds (BuildKit,
# Docker's default builder since 23.0); the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin coremq \
    && install -D -m 755 target/release/coremq /out/coremq

# ---- run ----
FROM debian:bookworm-slim
# A fixed uid/gid, so that a bind-mounted data dir can be chowned to it
# (chown 10001:10001 DIR on the host).
RUN groupadd --system --gid 10001 coremq \
    && useradd --system --uid 10001 --gid coremq --no-create-home \
       --home-dir /var/lib/coremq --shell /usr/sbin/nologin coremq \
    && install -d -m 700 -o coremq -g coremq /var/lib/coremq \
    && install -d -m 755 /etc/coremq
COPY --from=build /out/coremq /usr/local/bin/coremq
USER coremq:coremq
# A named volume starts with this directory's owner (coremq) and mode.
VOLUME /var/lib/coremq
# 1883 MQTT; 9183 --metrics-listen (GET /metrics, GET /healthz). 8883 (MQTT
# over TLS) and 9001 (MQTT over WebSocket) serve only when enabled with
# --tls-listen / --ws-listen (or the config file).
EXPOSE 1883 8883 9001 9183
# No curl in the image: bash (in debian:bookworm-slim) talks HTTP to
# /healthz through /dev/tcp. It needs --metrics-listen on 9183 as in CMD;
# a CMD without it needs --no-healthcheck (or HEALTHCHECK NONE) too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9183 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && read -r -t 4 status <&3 && [[ $status == *' 200 '* ]]"]
# coremq handles SIGTERM (clean shutdown, ~1.3 s) and SIGHUP (reload) as
# PID 1 itself: no init needed. Arguments after the image name replace CMD;
# `--config /etc/coremq/coremq.toml` reads a mounted file (flags override it).
ENTRYPOINT ["/usr/local/bin/coremq"]
CMD ["--listen", "0.0.0.0:1883", "--data-dir", "/var/lib/coremq", "--metrics-listen", "0.0.0.0:9183"]
