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
//! per `Consume` call. The spans then serve the log lines; each call still
//! gets a `trace_id` (its caller's `traceparent`'s, or a new one), shared
//! by its nested spans and passed on to the gRPC upstream and Creem.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{EnvFilter, fmt, prelude::*, registry::LookupSpan as _};

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
        // Colours only for a person at a terminal: escape codes in a log
        // file or a collector are noise (and cost a formatting pass for
        // every span).
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())))
            .try_init(),
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
/// records its `trace_id`.
///
/// Without OpenTelemetry installed the id is the caller's (from
/// `traceparent`), else the enclosing span's (a REST request's, for the
/// gateway's in-process gRPC call), else a new random one; it is kept on
/// the span so that [`inject_current`] passes it on.
pub fn adopt_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    let caller = parent.span().span_context().clone();
    if caller.is_valid() {
        let _ = span.set_parent(parent);
    }
    let own = span.context().span().span_context().trace_id();
    let trace = if own != TraceId::INVALID {
        own
    } else {
        let trace = Some(caller.trace_id())
            .filter(|t| *t != TraceId::INVALID)
            .or_else(|| log_trace(&tracing::Span::current()))
            .unwrap_or_else(|| TraceId::from(rand::random::<u128>().max(1)));
        keep_log_trace(span, trace);
        trace
    };
    span.record("trace_id", tracing::field::display(trace));
}

/// Keeps `trace` on `span` as its [`LogTrace`].
fn keep_log_trace(span: &tracing::Span, trace: TraceId) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(span) = dispatch
            .downcast_ref::<tracing_subscriber::Registry>()
            .and_then(|r| r.span(id))
        {
            span.extensions_mut().insert(LogTrace(trace));
        }
    });
}

/// The trace id of a call's log lines when OpenTelemetry is not installed.
#[derive(Clone, Copy)]
struct LogTrace(TraceId);

/// The [`LogTrace`] of `span` or the nearest span enclosing it.
fn log_trace(span: &tracing::Span) -> Option<TraceId> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        registry
            .span(id)?
            .scope()
            .find_map(|s| s.extensions().get::<LogTrace>().map(|t| t.0))
    })
    .flatten()
}

/// Writes the current span's trace context (`traceparent`) into `headers`,
/// for a call to another service. Without OpenTelemetry installed, the
/// call's log trace id goes on, under a new span id.
pub fn inject_current(headers: &mut http::HeaderMap) {
    let current = tracing::Span::current();
    let mut context = current.context();
    if !context.span().span_context().is_valid() {
        let Some(trace) = log_trace(&current) else {
            return;
        };
        context = context.with_remote_span_context(SpanContext::new(
            trace,
            SpanId::from(rand::random::<u64>().max(1)),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
    }
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

    /// Without OpenTelemetry and without a caller's trace, a call still
    /// gets a trace id: its nested spans share it, and a call it makes to
    /// another service carries it on.
    #[test]
    fn without_an_exporter_a_call_gets_a_trace_id_and_passes_it_on() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let subscriber =
            tracing_subscriber::registry().with(fmt::layer().with_writer(std::io::sink));
        let (outer, inner, sent) = tracing::subscriber::with_default(subscriber, || {
            let http = tracing::info_span!("http", trace_id = tracing::field::Empty);
            adopt_parent(&http, &http::HeaderMap::new());
            http.in_scope(|| {
                let grpc = tracing::info_span!("grpc", trace_id = tracing::field::Empty);
                adopt_parent(&grpc, &http::HeaderMap::new());
                grpc.in_scope(|| {
                    let mut headers = http::HeaderMap::new();
                    inject_current(&mut headers);
                    let sent = headers
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        .unwrap_or_default();
                    (log_trace(&http), log_trace(&grpc), sent)
                })
            })
        });
        let outer = outer.expect("the REST span has a trace id");
        assert_eq!(inner, Some(outer), "the nested call shares it");
        assert!(sent.starts_with(&format!("00-{outer}-")), "{sent}");
    }
}
