//! Running the service: Prometheus metrics after real traffic.

mod common;

use std::sync::Arc;

use billing::{auth::Role, clock::SystemClock, pb};
use common::{TestServer, authed, backends};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::transport::Channel;

type R = Result<(), Box<dyn std::error::Error>>;
const CREDIT: i64 = 1_000_000;
const CREEM_SECRET: &str = "creem-metrics-secret";

/// The value of the series `name{labels}` exactly as rendered, 0 when absent.
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name_and_labels)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

async fn scrape(t: &TestServer) -> Result<String, reqwest::Error> {
    t.http.get(t.rest("/metrics")).send().await?.text().await
}

async fn creem_event(t: &TestServer, body: &str, secret: &str) -> Result<u16, reqwest::Error> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(body.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    let response = t
        .http
        .post(t.rest("/payment/webhook/creem"))
        .header("content-type", "application/json")
        .header("creem-signature", signature)
        .body(body.to_owned())
        .send()
        .await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn metrics_count_calls_batches_credits_holds_and_webhooks() -> R {
    for backend in backends() {
        let t = TestServer::start_with(
            backend,
            &[("CREEM_WEBHOOK_SECRET", CREEM_SECRET)],
            Arc::new(SystemClock),
        )
        .await;
        let channel: Channel = t.channel().await;
        let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
        let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
        let service = t.token(Role::Service, "internal");
        let admin_token = t.token(Role::Admin, "ops");
        let before = scrape(&t).await?;

        admin
            .manual_adjust(authed(
                &admin_token,
                pb::ManualAdjustRequest {
                    org_id: "metered".into(),
                    amount_micros: 10 * CREDIT,
                    reason: "metrics test".into(),
                    expires_at: None,
                    idempotency_key: None,
                },
            ))
            .await?;
        // 1 GB of egress is 1 credit; the replay of "e-1" charges nothing.
        for key in ["e-1", "e-2", "e-1"] {
            usage
                .consume(authed(
                    &service,
                    pb::ConsumeRequest {
                        org_id: "metered".into(),
                        meter: "storage_egress".into(),
                        quantity: 1_000_000_000,
                        model: None,
                        idempotency_key: key.into(),
                        description: None,
                    },
                ))
                .await?;
        }
        usage
            .reserve(authed(
                &service,
                pb::ReserveRequest {
                    org_id: "metered".into(),
                    amount_micros: Some(3 * CREDIT),
                    idempotency_key: "hold-1".into(),
                    ..Default::default()
                },
            ))
            .await?;
        let refused = usage
            .consume(authed(
                &service,
                pb::ConsumeRequest {
                    org_id: "metered".into(),
                    meter: "storage_egress".into(),
                    quantity: 1_000_000_000_000,
                    model: None,
                    idempotency_key: "too-much".into(),
                    description: None,
                },
            ))
            .await
            .expect_err("more than the balance");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        let balance = t
            .http
            .get(t.rest("/credits/balance"))
            .bearer_auth(t.token(Role::User, "metered"))
            .send()
            .await?;
        assert_eq!(balance.status(), 200);
        let event = format!(
            r#"{{"id":"evt_metrics_{:?}","eventType":"ping.metrics","object":{{}}}}"#,
            t.backend
        );
        assert_eq!(creem_event(&t, &event, CREEM_SECRET).await?, 200);
        assert_eq!(creem_event(&t, &event, CREEM_SECRET).await?, 200);
        assert_eq!(creem_event(&t, &event, "wrong-secret").await?, 400);

        let after = scrape(&t).await?;
        let delta = |s: &str| series(&after, s) - series(&before, s);
        let consume_ok =
            "billing_grpc_requests_total{method=\"/billing.v1.UsageService/Consume\",code=\"OK\"}";
        assert!(delta(consume_ok) >= 3.0, "{after}");
        let refused_series = "billing_grpc_requests_total{method=\"/billing.v1.UsageService/Consume\",code=\"FAILED_PRECONDITION\"}";
        assert!(delta(refused_series) >= 1.0, "{after}");
        // A latency histogram, not a summary: cumulative buckets and +Inf.
        let inf = "billing_grpc_request_duration_seconds_bucket{method=\"/billing.v1.UsageService/Consume\",code=\"OK\",le=\"+Inf\"}";
        assert!(delta(inf) >= 3.0, "{after}");
        let rest =
            "billing_http_requests_total{method=\"GET\",route=\"/credits/balance\",status=\"200\"}";
        assert!(delta(rest) >= 1.0, "{after}");
        // The REST gateway's calls are gRPC calls too (in process).
        let via_gateway = "billing_grpc_requests_total{method=\"/billing.v1.CreditsService/GetBalance\",code=\"OK\"}";
        assert!(delta(via_gateway) >= 1.0, "{after}");
        // Exactly the two charges; the duplicate and the refusal add nothing.
        assert_eq!(
            delta("billing_credits_consumed_micros_total{meter=\"storage_egress\"}"),
            2.0 * CREDIT as f64,
            "{after}"
        );
        assert!(
            delta("billing_credits_granted_micros_total{kind=\"manual\"}") >= 10.0 * CREDIT as f64,
            "{after}"
        );
        assert!(delta("billing_holds_opened_total") >= 1.0, "{after}");
        assert!(series(&after, "billing_holds_open") >= 1.0, "{after}");
        assert!(
            series(&after, "billing_holds_open_micros") >= 3.0 * CREDIT as f64,
            "{after}"
        );
        assert!(
            after.contains("billing_ledger_batch_operations_bucket{path=\"locked\",le=\"1\"}"),
            "{after}"
        );
        assert!(
            after.contains("billing_ledger_batch_duration_seconds_count{path="),
            "{after}"
        );
        assert!(
            after.contains("billing_ledger_queue_depth{writer=\"0\"} 0"),
            "{after}"
        );
        assert!(
            after.contains("billing_db_pool_connections{pool=\"main\",state=\"idle\"}"),
            "{after}"
        );
        let webhook = |outcome: &str, kind: &str| {
            delta(&format!(
                "billing_webhook_events_total{{provider=\"creem\",type=\"{kind}\",outcome=\"{outcome}\"}}"
            ))
        };
        assert_eq!(webhook("applied", "ping.metrics"), 1.0, "{after}");
        assert_eq!(webhook("duplicate", "ping.metrics"), 1.0, "{after}");
        assert!(webhook("rejected", "unknown") >= 1.0, "{after}");
        t.stop().await;
    }
    Ok(())
}

#[test]
fn series_reads_one_exact_series() {
    let text = "a_total{x=\"1\"} 3\na_total{x=\"12\"} 5\n";
    assert_eq!(series(text, "a_total{x=\"1\"}"), 3.0);
    assert_eq!(series(text, "a_total{x=\"2\"}"), 0.0);
}
