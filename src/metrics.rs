//! Prometheus metrics at `/metrics`, recorded through the `metrics` facade
//! and rendered by `metrics-exporter-prometheus`.
//!
//! Every name the service records is a constant here, so the set of series
//! an operator sees is readable in one place:
//!
//! | series | kind | labels |
//! | --- | --- | --- |
//! | `billing_grpc_requests_total`, `billing_grpc_request_duration_seconds` | counter, histogram | `method` (`/pkg.Service/Method`), `code` (gRPC status name) |
//! | `billing_http_requests_total`, `billing_http_request_duration_seconds` | counter, histogram | `method`, `route` (template), `status` |
//! | `billing_ledger_batch_operations` | histogram | `path` (`warm`, `locked`) |
//! | `billing_ledger_batch_duration_seconds` | histogram (the transaction, commit included) | `path`, `result` (`ok`, `refused`, `unknown`, `error`) |
//! | `billing_ledger_queue_depth` | gauge, at scrape | `writer` |
//! | `billing_credits_consumed_micros_total` | counter | `meter` |
//! | `billing_credits_granted_micros_total` | counter | `kind` (lot kind) |
//! | `billing_credits_removed_micros_total` | counter | `reason` (`adjustment`, `void`, `take_back`) |
//! | `billing_holds_opened_total` | counter | |
//! | `billing_holds_open`, `billing_holds_open_micros` | gauge, at scrape (database-wide: every replica reports the same) | |
//! | `billing_webhook_events_total` | counter | `provider`, `type`, `outcome` |
//! | `billing_db_pool_connections` | gauge, at scrape | `state` (`in_use`, `idle`), `pool` |
//! | `billing_requests_in_flight`, `billing_requests_shed_total` | gauge, counter (calls answered now, calls refused past `MAX_IN_FLIGHT`; probes not counted) | `listener` (`grpc`, `rest`) |
//!
//! Latencies are true Prometheus histograms (buckets from 0.5 ms to 10 s),
//! so they aggregate across replicas. The recorder is process-wide (the
//! facade has one global recorder): several servers started in one process,
//! as the tests do, share it.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const GRPC_REQUESTS: &str = "billing_grpc_requests_total";
pub const GRPC_DURATION: &str = "billing_grpc_request_duration_seconds";
pub const HTTP_REQUESTS: &str = "billing_http_requests_total";
pub const HTTP_DURATION: &str = "billing_http_request_duration_seconds";
pub const BATCH_OPERATIONS: &str = "billing_ledger_batch_operations";
pub const BATCH_DURATION: &str = "billing_ledger_batch_duration_seconds";
pub const QUEUE_DEPTH: &str = "billing_ledger_queue_depth";
pub const CREDITS_CONSUMED: &str = "billing_credits_consumed_micros_total";
pub const CREDITS_GRANTED: &str = "billing_credits_granted_micros_total";
pub const CREDITS_REMOVED: &str = "billing_credits_removed_micros_total";
pub const HOLDS_OPENED: &str = "billing_holds_opened_total";
pub const HOLDS_OPEN: &str = "billing_holds_open";
pub const HOLDS_OPEN_MICROS: &str = "billing_holds_open_micros";
pub const WEBHOOK_EVENTS: &str = "billing_webhook_events_total";
pub const DB_POOL: &str = "billing_db_pool_connections";
pub const SHED: &str = "billing_requests_shed_total";
pub const IN_FLIGHT: &str = "billing_requests_in_flight";

/// Upper bounds of the latency buckets, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0,
    10.0,
];
/// Upper bounds of the batch-size buckets, in operations.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(BATCH_OPERATIONS.into()),
                    BATCH_BUCKETS,
                )
            });
        let builder = match builder {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "metric buckets refused; latencies render as summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            // An embedding program installed its own recorder: the
            // service's metrics go there, and /metrics shows none.
            tracing::warn!("a metrics recorder is already installed; /metrics stays empty");
        } else {
            describe();
        }
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(GRPC_REQUESTS, "gRPC calls answered, by method and status.");
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "Time to answer a gRPC call (until its response headers)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "REST requests answered, by route and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time to answer a REST request."
    );
    describe_histogram!(BATCH_OPERATIONS, "Operations carried by one ledger batch.");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time of one ledger batch's database work, commit included."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Jobs (one call's operations each) waiting in the ledger writer's queue."
    );
    describe_counter!(
        CREDITS_CONSUMED,
        "Micro-credits charged for usage (Consume and committed holds), by meter."
    );
    describe_counter!(
        CREDITS_GRANTED,
        "Micro-credits added to balances, by lot kind."
    );
    describe_counter!(
        CREDITS_REMOVED,
        "Micro-credits taken out other than by usage or expiry, by reason."
    );
    describe_counter!(HOLDS_OPENED, "Holds (reservations) opened.");
    describe_gauge!(HOLDS_OPEN, "Holds open now, in the whole database.");
    describe_gauge!(
        HOLDS_OPEN_MICROS,
        "Micro-credits held by open holds, in the whole database."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Payment webhook deliveries, by provider, event type and outcome."
    );
    describe_gauge!(DB_POOL, "Database pool connections, by state.");
    describe_gauge!(IN_FLIGHT, "Calls being answered now (probes not counted).");
    describe_counter!(
        SHED,
        "Calls refused because MAX_IN_FLIGHT calls were being answered."
    );
}

/// Work done just before a scrape (gauges read from the ledger and the
/// database).
pub type ScrapeHook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// What `/metrics` renders: the process's recorder, plus the gauges a
/// serving process refreshes at each scrape.
#[derive(Clone)]
pub struct Metrics {
    handle: &'static PrometheusHandle,
    refresh: Option<ScrapeHook>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            handle: handle(),
            refresh: None,
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Metrics whose scrape first runs `refresh` (bounded to 2 s).
    pub fn with_refresh(refresh: ScrapeHook) -> Self {
        Self {
            handle: handle(),
            refresh: Some(refresh),
        }
    }

    /// The Prometheus text exposition.
    pub async fn render(&self) -> String {
        if let Some(refresh) = &self.refresh
            && tokio::time::timeout(Duration::from_secs(2), refresh())
                .await
                .is_err()
        {
            tracing::warn!("metrics refresh took over 2 s; gauges may be stale");
        }
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Drains histogram buffers every `every` until `stop` (so a process
    /// nobody scrapes does not grow them without bound).
    pub fn spawn_upkeep(every: Duration, stop: tokio_util::sync::CancellationToken) {
        let handle = handle();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(every) => handle.run_upkeep(),
                }
            }
        });
    }
}

/// axum middleware recording every REST request under its route template.
pub async fn track_http(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}

/// The gRPC status name of a response: tonic answers every refusal of a
/// unary call "trailers-only", with `grpc-status` in the headers; a
/// response without it in its headers carries its body, and OK after it.
pub fn grpc_code<B>(response: &http::Response<B>) -> &'static str {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    code_name(code)
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Tower layer recording every gRPC call, whether it came over the network
/// or from the in-process REST gateway.
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await;
            let code = match &response {
                Ok(r) => grpc_code(r),
                Err(_) => code_name(tonic::Code::Unavailable),
            };
            // The code is a &'static str label: no allocation for it.
            metrics::counter!(GRPC_REQUESTS, "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!(GRPC_DURATION, "method" => method, "code" => code)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_trailers_only_headers() {
        let refused = http::Response::builder()
            .header("grpc-status", "8")
            .body(())
            .unwrap_or_default();
        assert_eq!(grpc_code(&refused), "RESOURCE_EXHAUSTED");
        let answered = http::Response::new(());
        assert_eq!(grpc_code(&answered), "OK");
    }
}
