//! Running the service: Prometheus metrics after real traffic.

mod common;

use std::sync::Arc;

use billing::{auth::Role, clock::SystemClock, pb};
use common::{
    TestServer, authed, backends,
    calls::{HeldCall, scrape, series},
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::transport::Channel;

type R = Result<(), Box<dyn std::error::Error>>;
const CREDIT: i64 = 1_000_000;
const CREEM_SECRET: &str = "creem-metrics-secret";

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
        assert!(after.contains("billing_ledger_queue_depth 0"), "{after}");
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

#[tokio::test]
async fn a_call_past_the_request_timeout_is_answered_504_and_writes_nothing() -> R {
    let t = TestServer::start_with(
        common::Backend::Sqlite,
        &[("REQUEST_TIMEOUT_SECONDS", "1")],
        Arc::new(SystemClock),
    )
    .await;
    let admin = t.token(Role::Admin, "ops");
    // The body never completes: the handler waits for it past the limit.
    let held = HeldCall::manual_adjust(
        &t,
        &admin,
        br#"{"org_id":"slow","amount":5,"reason":"never sent whole"}"#,
    )
    .await;
    let response = held.response.await??;
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error_code"], "TIMEOUT", "{body}");
    drop(held.rest);
    let balance = t
        .http
        .get(t.rest("/credits/balance"))
        .bearer_auth(t.token(Role::User, "slow"))
        .send()
        .await?;
    let body: serde_json::Value = balance.json().await?;
    assert_eq!(body["data"]["balance"], 0, "{body}");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_oversized_grpc_message_is_refused() -> R {
    let t = TestServer::start(common::Backend::Sqlite).await;
    let mut usage = pb::usage_service_client::UsageServiceClient::new(t.channel().await);
    let status = usage
        .consume(authed(
            &t.token(Role::Service, "internal"),
            pb::ConsumeRequest {
                org_id: "big".into(),
                meter: "ai_tokens".into(),
                quantity: 1,
                model: None,
                idempotency_key: "big".into(),
                description: Some("x".repeat(2 * 1024 * 1024)),
            },
        ))
        .await
        .expect_err("2 MiB message");
    // tonic's answer to a message over the limit (REST: 400).
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    t.stop().await;
    Ok(())
}

#[test]
fn series_reads_one_exact_series() {
    let text = "a_total{x=\"1\"} 3\na_total{x=\"12\"} 5\n";
    assert_eq!(series(text, "a_total{x=\"1\"}"), 3.0);
    assert_eq!(series(text, "a_total{x=\"2\"}"), 0.0);
}

/// A `billing serve` process of its own, started as an operator would.
struct Process {
    child: tokio::process::Child,
    grpc: String,
}

impl Process {
    async fn serve(database_url: &str, env: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_billing"));
        command
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .env("DATABASE_URL", database_url)
            .env("BILLING_JWT_SECRET", common::JWT_SECRET)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("billing serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut grpc = None;
        while let Some(line) = lines.next_line().await.expect("stdout line") {
            // "billing: gRPC + grpc-web on ADDR, REST on URL"
            if let Some(rest) = line.strip_prefix("billing: gRPC + grpc-web on ") {
                grpc = rest.split(',').next().map(str::to_owned);
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            grpc: format!("http://{}", grpc.expect("the service prints its addresses")),
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

#[tokio::test]
async fn sigterm_under_load_drains_and_loses_no_acknowledged_write() -> R {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    use tokio_stream::StreamExt as _;

    for backend in backends() {
        let db = common::TestDb::new(backend).await;
        let process = Process::serve(&db.url, &[("SHUTDOWN_DELAY_SECONDS", "1")]).await;
        let keys = billing::auth::JwtKeys::new(common::JWT_SECRET.to_owned().into());
        let now = chrono::Utc::now().timestamp();
        let token = |role: Role, org: &str| keys.issue("t-1", org, role, now, 3600);
        let channel = Channel::from_shared(process.grpc.clone())?
            .connect()
            .await?;
        pb::admin_service_client::AdminServiceClient::new(channel.clone())
            .manual_adjust(authed(
                &token(Role::Admin, "ops"),
                pb::ManualAdjustRequest {
                    org_id: "drained".into(),
                    amount_micros: 100_000 * CREDIT,
                    reason: "sigterm test".into(),
                    expires_at: None,
                    idempotency_key: None,
                },
            ))
            .await?;
        let mut watch = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        let first = watch.next().await.expect("health")?;
        assert_eq!(first.status, 1, "SERVING before the signal");

        // 16 callers on one connection, each until the service stops
        // answering (bounded: at most 2,000 calls each).
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let service = token(Role::Service, "internal");
        let mut callers = Vec::new();
        for caller in 0..16 {
            let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
            let (acknowledged, service) = (acknowledged.clone(), service.clone());
            callers.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..2_000 {
                    let key = format!("c{caller}-{i}");
                    let result = usage
                        .consume(authed(
                            &service,
                            pb::ConsumeRequest {
                                org_id: "drained".into(),
                                meter: "ai_tokens".into(),
                                quantity: 500_000,
                                model: None,
                                idempotency_key: key.clone(),
                                description: None,
                            },
                        ))
                        .await;
                    let ok = result.is_ok();
                    outcomes.push((key, result.map(|r| r.into_inner().transaction_id)));
                    if ok {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    } else {
                        break;
                    }
                }
                outcomes
            }));
        }
        while acknowledged.load(Ordering::Relaxed) < 200 {
            tokio::task::yield_now().await;
        }
        process.signal("TERM");
        let next = watch.next().await.expect("a health update")?;
        assert_eq!(next.status, 2, "NOT_SERVING as soon as the signal lands");
        // A watch is a stream the drain would wait for (until the grace
        // runs out): hang up, as a load balancer does once told.
        drop(watch);

        let mut outcomes = Vec::new();
        for caller in callers {
            outcomes.extend(caller.await?);
        }
        let mut process = process;
        let exit = process.child.wait().await?;
        assert!(
            exit.success(),
            "billing serve exits 0 after draining: {exit:?}"
        );

        // Every acknowledged charge is in the ledger, as acknowledged; a call
        // that failed (the doors closed) is there once or not at all.
        let conn = sea_orm::Database::connect(&db.url).await?;
        let rows = billing::entities::ledger_transaction::Entity::find()
            .filter(
                billing::entities::ledger_transaction::Column::ReferenceType.eq("idempotency_key"),
            )
            .all(&conn)
            .await?;
        let by_key: std::collections::HashMap<_, _> = rows
            .iter()
            .map(|r| (r.reference_id.clone().unwrap_or_default(), r.id.clone()))
            .collect();
        assert_eq!(by_key.len(), rows.len(), "no key charged twice");
        let (mut acked, mut failed) = (0, 0);
        for (key, outcome) in &outcomes {
            match outcome {
                Ok(transaction_id) => {
                    acked += 1;
                    assert_eq!(
                        by_key.get(key),
                        Some(transaction_id),
                        "acknowledged {key} lost"
                    );
                }
                Err(status) => {
                    failed += 1;
                    assert!(
                        matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::Unknown
                                | tonic::Code::Cancelled
                        ),
                        "a call refused at shutdown says so: {status:?}"
                    );
                }
            }
        }
        assert!(
            acked >= 200 && failed >= 1,
            "{acked} acknowledged, {failed} refused"
        );
        assert!(
            rows.len() <= outcomes.len(),
            "only keys that were sent are charged"
        );
        common::invariants::check(&conn, chrono::Utc::now()).await;
    }
    Ok(())
}
