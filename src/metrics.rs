//! Prometheus text metrics: request counts and latency sums per REST route
//! and per gRPC method. Small and dependency-free on purpose; counters are
//! kept behind one mutex, touched once per request.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};

#[derive(Default, Clone, Copy)]
struct Series {
    count: u64,
    seconds: f64,
}

#[derive(Default)]
pub struct Metrics {
    /// (method, route, status) → series
    http: Mutex<BTreeMap<(String, String, u16), Series>>,
    /// gRPC path → series
    grpc: Mutex<BTreeMap<String, Series>>,
}

impl Metrics {
    pub fn record_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        if let Ok(mut map) = self.http.lock() {
            let s = map
                .entry((method.to_owned(), route.to_owned(), status))
                .or_default();
            s.count += 1;
            s.seconds += seconds;
        }
    }

    pub fn record_grpc(&self, path: &str, seconds: f64) {
        if let Ok(mut map) = self.grpc.lock() {
            // The hot path: look up by &str, allocate only for a new method.
            if let Some(s) = map.get_mut(path) {
                s.count += 1;
                s.seconds += seconds;
            } else {
                map.insert(path.to_owned(), Series { count: 1, seconds });
            }
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP billing_http_requests_total REST requests by route and status.\n");
        out.push_str("# TYPE billing_http_requests_total counter\n");
        let http = self.http.lock().map(|m| m.clone()).unwrap_or_default();
        for ((method, route, status), s) in &http {
            let _ = writeln!(
                out,
                "billing_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        out.push_str(
            "# HELP billing_http_request_seconds_sum Time spent answering REST requests.\n",
        );
        out.push_str("# TYPE billing_http_request_seconds_sum counter\n");
        for ((method, route, status), s) in &http {
            let _ = writeln!(
                out,
                "billing_http_request_seconds_sum{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {:.6}",
                s.seconds
            );
        }
        out.push_str("# HELP billing_grpc_calls_total gRPC calls by method.\n");
        out.push_str("# TYPE billing_grpc_calls_total counter\n");
        let grpc = self.grpc.lock().map(|m| m.clone()).unwrap_or_default();
        for (path, s) in &grpc {
            let _ = writeln!(
                out,
                "billing_grpc_calls_total{{method=\"{path}\"}} {}",
                s.count
            );
        }
        out.push_str("# HELP billing_grpc_call_seconds_sum Time spent answering gRPC calls.\n");
        out.push_str("# TYPE billing_grpc_call_seconds_sum counter\n");
        for (path, s) in &grpc {
            let _ = writeln!(
                out,
                "billing_grpc_call_seconds_sum{{method=\"{path}\"}} {:.6}",
                s.seconds
            );
        }
        out
    }
}

/// axum middleware recording every REST request under its route template.
pub async fn track_http(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    metrics.record_http(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Tower layer recording every gRPC call (until its response headers).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>>,
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
        let path = req.uri().clone();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await;
            metrics.record_grpc(path.path(), started.elapsed().as_secs_f64());
            response
        })
    }
}
