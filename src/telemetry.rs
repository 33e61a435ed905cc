//! Logging and tracing: `RUST_LOG` filter, text or JSON lines, and
//! OpenTelemetry spans (exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
//!
//! The spans of one call: `http` (a REST route: method, route, status) →
//! `grpc` (method, org, gRPC status; the gateway's calls are in process)
//! → `ledger.write` (one operation, from enqueue to answer) → `ledger.batch`
//! (its batch, in the writer; child of the first operation that rode it
//! and linked from the others) → `db` (each statement of the batch). A
//! provider call is a `provider` span whose `traceparent` goes to Stripe or
//! Creem. An incoming W3C `traceparent` (gRPC metadata or HTTP header)
//! makes the call's spans part of the caller's trace. Every span carries
//! `trace_id`, so JSON log lines inside it name the trace.
//!
//! Without an endpoint the OpenTelemetry layer is not installed at all:
//! building spans that go nowhere cost the server about a fifth of its CPU
//! per `Consume` call. The spans still exist for the log lines, and a
//! caller's `traceparent` still gives them its `trace_id`.

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{Config, LogFormat};

/// The installed tracer provider, if any; [`Telemetry::shutdown`] flushes
/// it.
#[must_use = "call shutdown() before exiting, or spans still buffered are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends every span still buffered, then stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing traces at shutdown failed: {e}");
        }
    }
}

/// Installs logging and tracing from `config` (call inside the Tokio
/// runtime: the OTLP exporter is a tonic client).
pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(install(config, None));
    };
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    Ok(install(config, Some(provider)))
}

/// [`init`] with a provider of the caller's (tests: an in-memory exporter).
/// The first call in a process wins; later ones only hand back `provider`.
pub fn init_with(config: &Config, provider: SdkTracerProvider) -> Telemetry {
    install(config, Some(provider))
}

fn install(config: &Config, provider: Option<SdkTracerProvider>) -> Telemetry {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("billing")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let installed = match config.log_format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer()).try_init(),
    };
    if installed.is_ok() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        if let Some(provider) = &provider {
            opentelemetry::global::set_tracer_provider(provider.clone());
        }
    }
    Telemetry { provider }
}

/// Makes `span` a child of the W3C trace context in `headers`, if any, and
/// records its `trace_id`: its own trace's, or without OpenTelemetry
/// installed, the caller's.
pub fn adopt_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    let caller = parent.span().span_context().trace_id();
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
    let own = span.context().span().span_context().trace_id();
    if own == opentelemetry::trace::TraceId::INVALID && caller != own {
        span.record("trace_id", tracing::field::display(caller));
    }
}

/// Writes `span`'s OpenTelemetry trace id into its `trace_id` field.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Writes the current span's trace context (`traceparent`) into `headers`,
/// for a call to another service.
pub fn inject_current(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
    });
}

/// The `grpc` span of a call (tower-http's `MakeSpan`).
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcSpan;

impl<B> tower_http::trace::MakeSpan<B> for GrpcSpan {
    fn make_span(&mut self, req: &http::Request<B>) -> tracing::Span {
        let method = req.uri().path();
        let span = tracing::info_span!(
            "grpc",
            otel.name = %method.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            org = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        adopt_parent(&span, req.headers());
        span
    }
}

/// Records the gRPC status of the answer on the call's span.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcStatus;

impl<B> tower_http::trace::OnResponse<B> for GrpcStatus {
    fn on_response(
        self,
        response: &http::Response<B>,
        latency: std::time::Duration,
        span: &tracing::Span,
    ) {
        let code = crate::metrics::grpc_code(response);
        span.record("rpc.grpc.status_code", code);
        tracing::debug!(code, latency_ms = latency.as_secs_f64() * 1e3, "answered");
    }
}

/// The `http` span of a REST request, named by its route template.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpSpan;

impl<B> tower_http::trace::MakeSpan<B> for HttpSpan {
    fn make_span(&mut self, req: &http::Request<B>) -> tracing::Span {
        let route = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("unmatched", axum::extract::MatchedPath::as_str);
        let span = tracing::info_span!(
            "http",
            otel.name = %format_args!("{} {route}", req.method()),
            otel.kind = "server",
            http.request.method = %req.method(),
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        adopt_parent(&span, req.headers());
        span
    }
}

/// Records the HTTP status of the answer on the request's span.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpStatus;

impl<B> tower_http::trace::OnResponse<B> for HttpStatus {
    fn on_response(
        self,
        response: &http::Response<B>,
        latency: std::time::Duration,
        span: &tracing::Span,
    ) {
        let status = response.status().as_u16();
        span.record("http.response.status_code", status);
        tracing::debug!(status, latency_ms = latency.as_secs_f64() * 1e3, "answered");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::{fmt, prelude::*};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut lines) = self.0.lock() {
                lines.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Without OpenTelemetry installed (no endpoint), a caller's
    /// `traceparent` still names the trace in the log lines of its call.
    #[test]
    fn without_an_exporter_the_callers_trace_id_reaches_the_logs() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "traceparent",
                http::HeaderValue::from_static(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            );
            let span = tracing::info_span!("grpc", trace_id = tracing::field::Empty);
            adopt_parent(&span, &headers);
            span.in_scope(|| tracing::info!("inside the call"));
        });
        let text = String::from_utf8(lines.0.lock().map(|l| l.clone()).unwrap_or_default())
            .unwrap_or_default();
        assert!(
            text.contains(r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736""#),
            "{text}"
        );
    }
}
