//! OpenTelemetry traces, caught by an in-memory exporter: one REST call is
//! one trace, from the gateway through gRPC and the ledger to its database
//! work, and a caller's `traceparent` is that trace's parent. Alone in its
//! test binary, because the tracing subscriber is process-wide.

mod common;

use billing::{Config, auth::Role, pb};
use common::{Backend, TestServer, authed};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

type R = Result<(), Box<dyn std::error::Error>>;

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The spans of `trace`, and the one named `name` (exactly one).
fn named<'a>(spans: &'a [&'a SpanData], name: &str) -> &'a SpanData {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(found.len(), 1, "one `{name}` span in {names:?}");
    found[0]
}

/// The finished spans of `trace`, once every span named in `expected` is
/// among them: a caller can have its answer before the server's spans
/// close (the writer answers from inside its batch span; the REST span
/// ends after the last byte is written), so wait for them, for 10 s at
/// most.
async fn finished(
    provider: &SdkTracerProvider,
    exporter: &InMemorySpanExporter,
    trace: &str,
    expected: &[&str],
) -> Result<Vec<SpanData>, Box<dyn std::error::Error>> {
    let trace_id = TraceId::from_hex(trace)?;
    let start = std::time::Instant::now();
    loop {
        provider.force_flush()?;
        let spans: Vec<SpanData> = exporter
            .get_finished_spans()?
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .collect();
        let all_there = expected
            .iter()
            .all(|name| spans.iter().any(|s| s.name == *name));
        if all_there || start.elapsed() > std::time::Duration::from_secs(10) {
            return Ok(spans);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_rest_call_is_one_trace_from_gateway_to_database() -> R {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let config = Config::from_lookup(|_| None)?;
    let _telemetry = billing::telemetry::init_with(&config, provider.clone());
    let t = TestServer::start(Backend::Sqlite).await;

    // A caller's trace: 00-<trace id>-<parent span id>-<sampled>.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = t
        .http
        .post(t.rest("/admin/credits/manual"))
        .bearer_auth(t.token(Role::Admin, "ops"))
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&serde_json::json!({"org_id": "traced", "amount": 5, "reason": "trace test"}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let all = finished(
        &provider,
        &exporter,
        trace,
        &[
            "POST /admin/credits/manual",
            "billing.v1.AdminService/ManualAdjust",
            "ledger adjust",
            "ledger.batch",
            "COMMIT",
        ],
    )
    .await?;
    let spans: Vec<&SpanData> = all.iter().collect();

    let http = named(&spans, "POST /admin/credits/manual");
    assert_eq!(http.parent_span_id, SpanId::from_hex(caller_span)?);
    assert_eq!(
        attribute(http, "http.response.status_code").as_deref(),
        Some("200")
    );
    let grpc = named(&spans, "billing.v1.AdminService/ManualAdjust");
    assert_eq!(grpc.parent_span_id, http.span_context.span_id());
    assert_eq!(attribute(grpc, "org").as_deref(), Some("ops"));
    assert_eq!(
        attribute(grpc, "rpc.grpc.status_code").as_deref(),
        Some("OK")
    );
    let write = named(&spans, "ledger adjust");
    let write_parent = spans
        .iter()
        .find(|s| s.span_context.span_id() == write.parent_span_id)
        .expect("ledger.write has a parent in the trace");
    // The write is inside the gRPC call (directly or below a handler span).
    let mut cursor = *write_parent;
    while cursor.span_context.span_id() != grpc.span_context.span_id() {
        cursor = spans
            .iter()
            .find(|s| s.span_context.span_id() == cursor.parent_span_id)
            .expect("the ledger write descends from the gRPC call");
    }
    let batch = named(&spans, "ledger.batch");
    assert_eq!(batch.parent_span_id, write.span_context.span_id());
    assert_eq!(attribute(batch, "operations").as_deref(), Some("1"));
    for step in ["BEGIN", "lock, load and write", "COMMIT"] {
        let db = named(&spans, step);
        assert_eq!(db.parent_span_id, batch.span_context.span_id(), "{step}");
    }

    // gRPC metadata carries a trace the same way.
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = authed(
        &t.token(Role::Service, "internal"),
        pb::ConsumeRequest {
            org_id: "traced".into(),
            meter: "ai_tokens".into(),
            quantity: 1_000,
            model: None,
            idempotency_key: "traced-1".into(),
            description: None,
        },
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-b7ad6b7169203331-01").parse()?,
    );
    pb::usage_service_client::UsageServiceClient::new(t.channel().await)
        .consume(request)
        .await?;
    let all = finished(
        &provider,
        &exporter,
        grpc_trace,
        &[
            "billing.v1.UsageService/Consume",
            "ledger consume",
            "ledger.batch",
        ],
    )
    .await?;
    let spans: Vec<&SpanData> = all.iter().collect();
    let consume = named(&spans, "billing.v1.UsageService/Consume");
    assert_eq!(
        consume.parent_span_id,
        SpanId::from_hex("b7ad6b7169203331")?
    );
    named(&spans, "ledger consume");
    named(&spans, "ledger.batch");
    t.stop().await;
    Ok(())
}
