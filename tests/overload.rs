//! Overload: calls past `MAX_IN_FLIGHT` are refused at once, probes are
//! not. Alone in its own test binary, because it reads the process-wide
//! in-flight gauge to know its held call has reached the server.

mod common;

use std::sync::Arc;

use billing::{auth::Role, clock::SystemClock, pb};
use common::{
    TestServer, authed,
    calls::{HeldCall, scrape, series},
};

type R = Result<(), Box<dyn std::error::Error>>;

/// Waits until `listener` answers `n` calls (the held one reached the
/// server; bounded by count, not time).
async fn in_flight_reaches(t: &TestServer, listener: &str, n: f64) -> R {
    let name = format!("billing_requests_in_flight{{listener=\"{listener}\"}}");
    for _ in 0..2000 {
        if series(&scrape(t).await?, &name) == n {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    Err(format!("{name} never reached {n}").into())
}

/// A gRPC frame (uncompressed) around an encoded message.
fn grpc_frame(message: &impl prost::Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    frame
}

#[tokio::test]
async fn calls_past_max_in_flight_are_refused_at_once_and_probes_still_answer() -> R {
    let t = TestServer::start_with(
        common::Backend::Sqlite,
        &[("MAX_IN_FLIGHT", "1")],
        Arc::new(SystemClock),
    )
    .await;
    let admin = t.token(Role::Admin, "ops");
    let user = t.token(Role::User, "busy");

    // REST: one manual adjustment held in flight takes the only slot.
    let held = HeldCall::manual_adjust(
        &t,
        &admin,
        br#"{"org_id":"busy","amount":5,"reason":"held"}"#,
    )
    .await;
    in_flight_reaches(&t, "rest", 1.0).await?;
    let refused = t
        .http
        .get(t.rest("/credits/balance"))
        .bearer_auth(&user)
        .send()
        .await?;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = refused.json().await?;
    assert_eq!(body["error_code"], "RESOURCE_EXHAUSTED", "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(t.http.get(t.rest("/healthz")).send().await?.status(), 200);
    assert_eq!(t.http.get(t.rest("/metrics")).send().await?.status(), 200);
    let done = held.finish().await;
    assert_eq!(done.status(), 200, "the held call itself is answered");
    let after = t
        .http
        .get(t.rest("/credits/balance"))
        .bearer_auth(&user)
        .send()
        .await?;
    assert_eq!(after.status(), 200, "the slot is free again");
    let body: serde_json::Value = after.json().await?;
    assert_eq!(body["data"]["balance"], 5, "{body}");

    // gRPC: the same on its own listener.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let service = t.token(Role::Service, "internal");
    // ai_tokens: the metrics test, running beside this one, counts the
    // storage_egress charges of the whole process exactly.
    let consume = |key: &str| pb::ConsumeRequest {
        org_id: "busy".into(),
        meter: "ai_tokens".into(),
        quantity: 1,
        model: None,
        idempotency_key: key.into(),
        description: None,
    };
    let held = HeldCall::start(
        &h2,
        format!("{}/billing.v1.UsageService/Consume", t.grpc_url()),
        &[
            ("content-type", "application/grpc".into()),
            ("te", "trailers".into()),
            ("authorization", format!("Bearer {service}")),
        ],
        grpc_frame(&consume("held")),
    )
    .await;
    let mut usage = pb::usage_service_client::UsageServiceClient::new(t.channel().await);
    in_flight_reaches(&t, "grpc", 1.0).await?;
    let shed = usage
        .consume(authed(&service, consume("refused")))
        .await
        .expect_err("a second gRPC call is refused while one is in flight");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("MAX_IN_FLIGHT"), "{shed:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(t.channel().await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(serving.status, 1, "health is never shed");
    let done = held.finish().await;
    assert_eq!(done.status(), 200);
    assert_eq!(
        done.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()),
        None,
        "the held call was not refused (its status comes in the trailers)"
    );
    let last = usage.consume(authed(&service, consume("after"))).await?;
    assert!(!last.into_inner().duplicate);
    common::invariants::check(&t.server.state.db, chrono::Utc::now()).await;
    t.stop().await;
    Ok(())
}
