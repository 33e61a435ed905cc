# Image for the Helm chart: `docker build -t billing:0.1.0 .`
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin billing

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/billing /usr/local/bin/billing
# Listen on every interface inside the container (the defaults are loopback).
ENV GRPC_ADDR=0.0.0.0:50051 HTTP_ADDR=0.0.0.0:8080
USER 65534:65534
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/billing"]
CMD ["serve"]
