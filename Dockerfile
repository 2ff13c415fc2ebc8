# The ipvslb image: one static binary (glibc linked in, as the project measures it) on an empty,
# distroless-style base, running as a non-root user (the director's DaemonSet runs it as uid 0
# with only CAP_NET_ADMIN; see the chart).
#
#   docker build -t ipvslb/ipvslb:0.1.0 .
#
# The tag is the workspace version, which is also the chart's appVersion and default image tag
# (a test checks that the three agree). CI has no container engine: `cargo xtask image-binary`
# (run by `cargo xtask test`) builds the binary with the same command as below, proves it
# static and runs it with an empty environment.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p ipvslb --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/ipvslb /out/ipvslb \
 && mkdir -p /out/etc \
 && echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' > /out/etc/passwd \
 && echo 'nonroot:x:65532:' > /out/etc/group

FROM scratch
LABEL org.opencontainers.image.title="ipvslb" \
      org.opencontainers.image.description="Bare-metal LoadBalancer Services for Kubernetes, with Linux IPVS" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/etc/passwd /out/etc/group /etc/
COPY --from=build /out/ipvslb /ipvslb
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/ipvslb"]
CMD ["run"]
