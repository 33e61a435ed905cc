//! The credit ledger over the real transports: consumption and rates,
//! idempotency, holds, expiry on an injected clock, lot order, manual
//! adjustments, and every credits read in the contract's shapes.

mod common;

use std::sync::Arc;

use billing::{
    auth::Role,
    clock::{Clock, ManualClock},
    pb,
};
use chrono::{TimeDelta, Utc};
use common::{Backend, TestServer, authed, backends, invariants, json_of, reason};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};

type R = Result<(), Box<dyn std::error::Error>>;
const CREDIT: i64 = 1_000_000;

struct Clients {
    usage: pb::usage_service_client::UsageServiceClient<Channel>,
    admin: pb::admin_service_client::AdminServiceClient<Channel>,
    credits: pb::credits_service_client::CreditsServiceClient<Channel>,
    service: String,
    admin_token: String,
}

/// The `status`, `transaction_id` and `charged_micros` that a
/// RESERVATION_FINISHED error carries (those present).
fn finish_of(status: &tonic::Status) -> Vec<(&'static str, String)> {
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("error info");
    ["status", "transaction_id", "charged_micros"]
        .into_iter()
        .filter_map(|k| info.metadata.get(k).map(|v| (k, v.clone())))
        .collect()
}

impl Clients {
    async fn new(t: &TestServer) -> Self {
        let ch = t.channel().await;
        Self {
            usage: pb::usage_service_client::UsageServiceClient::new(ch.clone()),
            admin: pb::admin_service_client::AdminServiceClient::new(ch.clone()),
            credits: pb::credits_service_client::CreditsServiceClient::new(ch),
            service: t.token(Role::Service, "internal"),
            admin_token: t.token(Role::Admin, "ops"),
        }
    }

    async fn grant(
        &mut self,
        org: &str,
        micros: i64,
        expires_in: Option<TimeDelta>,
        now: chrono::DateTime<Utc>,
    ) -> i64 {
        let request = pb::ManualAdjustRequest {
            org_id: org.into(),
            amount_micros: micros,
            reason: "test grant".into(),
            expires_at: expires_in.map(|d| {
                let at = now + d;
                prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: 0,
                }
            }),
            idempotency_key: None,
        };
        self.admin
            .manual_adjust(authed(&self.admin_token, request))
            .await
            .expect("grant")
            .into_inner()
            .balance_micros
    }

    async fn consume(
        &mut self,
        org: &str,
        meter: &str,
        quantity: i64,
        key: &str,
    ) -> Result<pb::ConsumeResponse, tonic::Status> {
        self.consume_model(org, meter, quantity, None, key).await
    }

    async fn consume_model(
        &mut self,
        org: &str,
        meter: &str,
        quantity: i64,
        model: Option<&str>,
        key: &str,
    ) -> Result<pb::ConsumeResponse, tonic::Status> {
        let request = pb::ConsumeRequest {
            org_id: org.into(),
            meter: meter.into(),
            quantity,
            model: model.map(str::to_owned),
            idempotency_key: key.into(),
            description: None,
        };
        self.usage
            .consume(authed(&self.service, request))
            .await
            .map(|r| r.into_inner())
    }

    async fn balance(&mut self, t: &TestServer, org: &str) -> pb::GetBalanceResponse {
        self.credits
            .get_balance(authed(&t.token(Role::User, org), pb::GetBalanceRequest {}))
            .await
            .expect("balance")
            .into_inner()
    }
}

#[tokio::test]
async fn consume_charges_rates_exactly_and_replays_idempotently() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let mut c = Clients::new(&t).await;
        c.grant("acme", 10 * CREDIT, None, Utc::now()).await;

        // Default ai_tokens rate: 2 credits per 1M tokens.
        let first = c.consume("acme", "ai_tokens", 1_500_000, "req-1").await?;
        assert_eq!(
            (first.charged_micros, first.balance_micros, first.duplicate),
            (3 * CREDIT, 7 * CREDIT, false)
        );
        let replay = c.consume("acme", "ai_tokens", 1_500_000, "req-1").await?;
        assert_eq!(replay.transaction_id, first.transaction_id);
        assert_eq!(
            (
                replay.charged_micros,
                replay.balance_micros,
                replay.duplicate
            ),
            (3 * CREDIT, 7 * CREDIT, true)
        );
        let err = c
            .consume("acme", "ai_tokens", 2_000_000, "req-1")
            .await
            .expect_err("key reuse");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED")
        );
        // The same key under another method or org is another key.
        c.grant("other", CREDIT, None, Utc::now()).await;
        assert!(!c.consume("other", "ai_tokens", 1, "req-1").await?.duplicate);

        // Per-model rate (gpt-4o: 10 per 1M), unknown models fall back.
        let r = c
            .consume_model("acme", "ai_tokens", 100_000, Some("gpt-4o"), "req-2")
            .await?;
        assert_eq!(r.charged_micros, CREDIT);
        let r = c
            .consume_model("acme", "ai_tokens", 100_000, Some("no-such-model"), "req-3")
            .await?;
        assert_eq!(r.charged_micros, 200_000);
        // Egress: 1 credit per GB, rounded up to the micro.
        let r = c.consume("acme", "storage_egress", 1, "req-4").await?;
        assert_eq!(r.charged_micros, 1);
        let r = c
            .consume("acme", "storage_egress", 1_500_000_000, "req-5")
            .await?;
        assert_eq!(r.charged_micros, 1_500_000);

        // Refusals write nothing.
        let before = invariants::rows_by_org(&t.server.state.db).await["acme"].len();
        let err = c
            .consume("acme", "ai_tokens", 1_000_000_000, "req-6")
            .await
            .expect_err("too much");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::FailedPrecondition, "INSUFFICIENT_CREDITS")
        );
        for (meter, quantity, field) in [
            ("bandwidth", 5, "meter"),
            ("ai_tokens", 0, "quantity"),
            ("ai_tokens", -5, "quantity"),
        ] {
            let err = c
                .consume("acme", meter, quantity, "req-7")
                .await
                .expect_err("bad input");
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().starts_with(field), "{}", err.message());
        }
        let err = c
            .consume("acme", "ai_tokens", 5, "")
            .await
            .expect_err("no key");
        assert!(err.message().starts_with("idempotency_key"));
        assert_eq!(
            invariants::rows_by_org(&t.server.state.db).await["acme"].len(),
            before
        );
        // After a refusal the same key works once credits are there.
        c.grant("acme", 2000 * CREDIT, None, Utc::now()).await;
        assert!(
            !c.consume("acme", "ai_tokens", 1_000_000_000, "req-6")
                .await?
                .duplicate
        );

        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn holds_reserve_commit_release() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let mut c = Clients::new(&t).await;
        c.grant("acme", 10 * CREDIT, None, Utc::now()).await;
        let reserve = |amount: Option<i64>, key: &str| pb::ReserveRequest {
            org_id: "acme".into(),
            amount_micros: amount,
            idempotency_key: key.into(),
            ..Default::default()
        };

        let hold = c
            .usage
            .reserve(authed(&c.service, reserve(Some(6 * CREDIT), "h1")))
            .await?
            .into_inner();
        assert_eq!(hold.held_micros, 6 * CREDIT);
        let again = c
            .usage
            .reserve(authed(&c.service, reserve(Some(6 * CREDIT), "h1")))
            .await?
            .into_inner();
        assert_eq!(
            (again.reservation_id.as_str(), again.duplicate),
            (hold.reservation_id.as_str(), true)
        );
        let b = c.balance(&t, "acme").await;
        assert_eq!(
            (b.stored_micros, b.realtime_micros, b.balance_micros),
            (10 * CREDIT, 6 * CREDIT, 4 * CREDIT)
        );
        // Held credits are not spendable by others.
        let err = c
            .consume("acme", "ai_tokens", 2_500_000, "c1")
            .await
            .expect_err("held");
        assert_eq!(reason(&err), "INSUFFICIENT_CREDITS");
        let err = c
            .usage
            .reserve(authed(&c.service, reserve(Some(5 * CREDIT), "h2")))
            .await
            .expect_err("held");
        assert_eq!(reason(&err), "INSUFFICIENT_CREDITS");

        // Actual cost 4 credits (2M tokens): 2 credits of the hold come back.
        let commit = pb::CommitRequest {
            reservation_id: hold.reservation_id.clone(),
            meter: "ai_tokens".into(),
            quantity: 2_000_000,
            ..Default::default()
        };
        let done = c
            .usage
            .commit(authed(&c.service, commit.clone()))
            .await?
            .into_inner();
        assert_eq!(
            (
                done.charged_micros,
                done.shortfall_micros,
                done.released_micros,
                done.balance_micros
            ),
            (4 * CREDIT, 0, 2 * CREDIT, 6 * CREDIT)
        );
        let err = c
            .usage
            .commit(authed(&c.service, commit))
            .await
            .expect_err("finished");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::FailedPrecondition, "RESERVATION_FINISHED")
        );
        // It says how the hold finished, so a caller whose Commit timed
        // out learns what was charged.
        let committed = [
            ("status", "committed".to_owned()),
            ("transaction_id", done.transaction_id.clone()),
            ("charged_micros", (4 * CREDIT).to_string()),
        ];
        assert_eq!(finish_of(&err), committed);
        let release = pb::ReleaseRequest {
            reservation_id: hold.reservation_id.clone(),
        };
        let err = c
            .usage
            .release(authed(&c.service, release))
            .await
            .expect_err("finished");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(finish_of(&err), committed);

        // A hold by usage, released whole.
        let by_usage = pb::ReserveRequest {
            org_id: "acme".into(),
            meter: Some("ai_tokens".into()),
            quantity: Some(1_000_000),
            idempotency_key: "h3".into(),
            ..Default::default()
        };
        let hold = c
            .usage
            .reserve(authed(&c.service, by_usage))
            .await?
            .into_inner();
        assert_eq!(hold.held_micros, 2 * CREDIT);
        let released = c
            .usage
            .release(authed(
                &c.service,
                pb::ReleaseRequest {
                    reservation_id: hold.reservation_id,
                },
            ))
            .await?
            .into_inner();
        assert_eq!(
            (released.released_micros, released.balance_micros),
            (2 * CREDIT, 6 * CREDIT)
        );

        // Commit beyond hold and balance: charges what there is, reports the rest.
        let hold = c
            .usage
            .reserve(authed(&c.service, reserve(Some(CREDIT), "h4")))
            .await?
            .into_inner();
        let commit = pb::CommitRequest {
            reservation_id: hold.reservation_id,
            meter: "ai_tokens".into(),
            quantity: 5_000_000,
            ..Default::default()
        };
        let done = c
            .usage
            .commit(authed(&c.service, commit))
            .await?
            .into_inner();
        assert_eq!(
            (
                done.charged_micros,
                done.shortfall_micros,
                done.balance_micros
            ),
            (6 * CREDIT, 4 * CREDIT, 0)
        );

        for (request, field) in [
            (
                pb::ReserveRequest {
                    org_id: "acme".into(),
                    amount_micros: Some(1),
                    ttl_seconds: Some(3601),
                    idempotency_key: "x".into(),
                    ..Default::default()
                },
                "ttl_seconds",
            ),
            (
                pb::ReserveRequest {
                    org_id: "acme".into(),
                    idempotency_key: "x".into(),
                    ..Default::default()
                },
                "amount_micros",
            ),
            (
                pb::ReserveRequest {
                    org_id: "acme".into(),
                    amount_micros: Some(-3),
                    idempotency_key: "x".into(),
                    ..Default::default()
                },
                "amount_micros",
            ),
        ] {
            let err = c
                .usage
                .reserve(authed(&c.service, request))
                .await
                .expect_err("bad input");
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().starts_with(field), "{}", err.message());
        }
        let err = c
            .usage
            .commit(authed(
                &c.service,
                pb::CommitRequest {
                    reservation_id: "nope".into(),
                    meter: "ai_tokens".into(),
                    quantity: 1,
                    ..Default::default()
                },
            ))
            .await
            .expect_err("unknown hold");
        assert_eq!(err.code(), Code::NotFound);

        let allowance = c
            .usage
            .check_allowance(authed(
                &c.service,
                pb::CheckAllowanceRequest {
                    org_id: "acme".into(),
                },
            ))
            .await?
            .into_inner();
        assert_eq!(
            (allowance.allow_usage, allowance.available_micros),
            (false, 0)
        );
        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn expiry_on_an_injected_clock() -> R {
    for backend in backends() {
        let clock = ManualClock::new(Utc::now());
        let t = TestServer::start_with(backend, &[], Arc::new(clock.clone())).await;
        let mut c = Clients::new(&t).await;
        let now = clock.now();
        c.grant("acme", 5 * CREDIT, Some(TimeDelta::hours(1)), now)
            .await;
        c.grant("acme", 3 * CREDIT, Some(TimeDelta::hours(3)), now)
            .await;
        c.grant("acme", 2 * CREDIT, None, now).await;

        // Earliest expiry is spent first.
        c.consume("acme", "ai_tokens", 2_000_000, "a").await?; // 4 credits
        let info = c
            .credits
            .get_credit_info(authed(
                &t.token(Role::User, "acme"),
                pb::GetCreditInfoRequest {},
            ))
            .await?
            .into_inner();
        let remaining: Vec<i64> = info.breakdown.iter().map(|l| l.remaining_micros).collect();
        assert_eq!(remaining, [CREDIT, 3 * CREDIT, 2 * CREDIT]);

        let hold = c
            .usage
            .reserve(authed(
                &c.service,
                pb::ReserveRequest {
                    org_id: "acme".into(),
                    amount_micros: Some(CREDIT),
                    ttl_seconds: Some(60),
                    idempotency_key: "h".into(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();

        // Two hours on: the first lot has expired, the hold too, before any sweep.
        clock.advance(TimeDelta::hours(2));
        let b = c.balance(&t, "acme").await;
        assert_eq!(
            (b.stored_micros, b.realtime_micros, b.balance_micros),
            (5 * CREDIT, 0, 5 * CREDIT)
        );
        let err = c
            .usage
            .commit(authed(
                &c.service,
                pb::CommitRequest {
                    reservation_id: hold.reservation_id,
                    meter: "ai_tokens".into(),
                    quantity: 1,
                    ..Default::default()
                },
            ))
            .await
            .expect_err("expired hold");
        assert_eq!(reason(&err), "RESERVATION_FINISHED");
        assert!(err.message().contains("expired"), "{}", err.message());
        let err = c
            .consume("acme", "ai_tokens", 2_500_001, "b")
            .await
            .expect_err("only 5 live");
        assert_eq!(reason(&err), "INSUFFICIENT_CREDITS");

        // The write above swept the organization: an `expiry` row exists.
        let rows = invariants::rows_by_org(&t.server.state.db).await;
        let expiry: Vec<_> = rows["acme"].iter().filter(|r| r.kind == "expiry").collect();
        assert_eq!(expiry.len(), 1);
        assert_eq!(expiry[0].amount_micros, -CREDIT);
        invariants::check(&t.server.state.db, clock.now()).await;

        // A quiet organization is swept by the background sweep.
        c.grant(
            "quiet",
            2 * CREDIT,
            Some(TimeDelta::minutes(5)),
            clock.now(),
        )
        .await;
        clock.advance(TimeDelta::minutes(10));
        let swept = billing::ledger::sweeper::sweep_all(&t.server.state.ledger).await?;
        assert!(swept >= 1);
        invariants::check(&t.server.state.db, clock.now()).await;
        let b = c.balance(&t, "quiet").await;
        assert_eq!(b.stored_micros, 0);
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn credits_routes_over_rest() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let mut c = Clients::new(&t).await;
        let user = t.token(Role::User, "acme");
        let admin = t.token(Role::Admin, "ops");
        let http = &t.http;

        // Manual grant and debit over REST, exact decimals.
        let (status, body) = json_of(
            http.post(t.rest("/admin/credits/manual"))
                .bearer_auth(&admin)
                .json(&json!({"org_id": "acme", "amount": 12.5, "reason": "welcome"}))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["balance"], json!(12.5));
        let (status, body) = json_of(
            http.post(t.rest("/admin/credits/manual"))
                .bearer_auth(&admin)
                .json(&json!({"org_id": "acme", "amount": -20, "reason": "too much"}))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (409, Some("INSUFFICIENT_CREDITS"))
        );
        for (body, field) in [
            (
                json!({"org_id": "acme", "amount": "5", "reason": "r"}),
                "amount",
            ),
            (
                json!({"org_id": "acme", "amount": 0.0000001, "reason": "r"}),
                "amount",
            ),
            (
                json!({"org_id": "acme", "amount": 0, "reason": "r"}),
                "amount",
            ),
            (
                json!({"org_id": "acme", "amount": 1, "reason": ""}),
                "reason",
            ),
            (
                json!({"org_id": "acme", "amount": 1, "reason": "r", "expires_at": "tomorrow"}),
                "expires_at",
            ),
        ] {
            let (status, answer) = json_of(
                http.post(t.rest("/admin/credits/manual"))
                    .bearer_auth(&admin)
                    .json(&body)
                    .send()
                    .await?,
            )
            .await?;
            assert_eq!(
                (status, answer["error_code"].as_str()),
                (400, Some("INVALID_ARGUMENT")),
                "{body}"
            );
            assert!(
                answer["message"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(field),
                "{answer}"
            );
        }
        // 401 before 400: a malformed body without a token is unauthorized.
        let response = http
            .post(t.rest("/admin/credits/manual"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await?;
        assert_eq!(response.status(), 401);
        let (status, _) = json_of(
            http.post(t.rest("/admin/credits/manual"))
                .bearer_auth(&user)
                .json(&json!({"org_id": "acme", "amount": "x"}))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status, 403);

        c.consume("acme", "ai_tokens", 1_000_000, "u1").await?; // 2 credits
        c.consume("acme", "storage_egress", 500_000_000, "u2")
            .await?; // 0.5 credits

        let (status, body) = json_of(
            http.get(t.rest("/credits/balance"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status, 200);
        let data = &body["data"];
        assert_eq!(data["balance"], json!(10));
        assert_eq!(data["stored"], json!(10));
        assert_eq!(data["realtime"], json!(0));
        assert_eq!(
            data["consumption"],
            json!({"storage_egress": 0.5, "ai_tokens": 2, "total": 2.5})
        );
        assert!(
            data["period_start"]
                .as_str()
                .is_some_and(|s| s.ends_with("-01T00:00:00.000Z"))
        );

        let (_, body) = json_of(
            http.get(t.rest("/credits/transactions?limit=2"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        let rows = body["data"].as_array().ok_or("rows")?;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["type"], "storage_egress");
        assert_eq!(rows[0]["amount"], json!(-0.5));
        assert_eq!(rows[0]["balance_after"], json!(10));
        assert_eq!(rows[1]["type"], "ai_usage");
        assert_eq!(
            body["pagination"],
            json!({"limit": 2, "offset": 0, "total": 3, "has_more": true})
        );
        let (_, body) = json_of(
            http.get(t.rest("/credits/transactions?type=manual&offset=0"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
        for query in [
            "limit=0",
            "limit=101",
            "limit=abc",
            "offset=-1",
            "offset=2836940197792884736",
            "limit=",
            "type=",
            "type=bogus",
        ] {
            let (status, body) = json_of(
                http.get(t.rest(&format!("/credits/transactions?{query}")))
                    .bearer_auth(&user)
                    .send()
                    .await?,
            )
            .await?;
            assert_eq!(
                (status, body["error_code"].as_str()),
                (400, Some("INVALID_ARGUMENT")),
                "{query}"
            );
            let message = body["message"].as_str().unwrap_or_default();
            let expected = match query {
                "limit=abc" => "is not an integer",
                "offset=2836940197792884736" => "out of range",
                "limit=" | "type=" => "is empty",
                _ => "",
            };
            assert!(message.contains(expected), "{query}: {message}");
        }

        let (_, body) = json_of(
            http.get(t.rest("/credits/stats/monthly"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        let months = body["data"].as_array().ok_or("months")?;
        assert_eq!(months.len(), 12);
        let current = &months[11];
        assert_eq!(current["consumption"], json!(2.5));
        assert_eq!(current["grants"], json!(12.5));
        assert_eq!(current["balance"], json!(10));
        assert_eq!(months[0]["balance"], json!(0));
        assert_eq!(body["totals"]["balance"], json!(10));
        for months in ["0", "25", "x"] {
            let (status, _) = json_of(
                http.get(t.rest(&format!("/credits/stats/monthly?months={months}")))
                    .bearer_auth(&user)
                    .send()
                    .await?,
            )
            .await?;
            assert_eq!(status, 400, "months={months}");
        }

        let (status, info) = json_of(
            http.get(t.rest("/user/credits/info"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status, 200);
        assert_eq!(info["credits"], 10);
        assert_eq!(info["allow_usage"], true);
        assert_eq!(info["active_subscription"]["id"], "SUB_BASE");
        assert_eq!(info["breakdown"][0]["purchase_kind"], "Manual");
        assert_eq!(info["breakdown"][0]["remaining_units"], 10);
        assert_eq!(info["breakdown"][0]["expiry_date"], Value::Null);
        let (status, info) = json_of(http.get(t.rest("/user/credits/info")).send().await?).await?;
        assert_eq!((status, info), (402, json!({"error": "INVALID_API_KEY"})));

        let (_, body) = json_of(
            http.get(t.rest("/admin/credits/transactions?org_id=acme&type=ai_usage"))
                .bearer_auth(&admin)
                .send()
                .await?,
        )
        .await?;
        let rows = body["data"].as_array().ok_or("rows")?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["org_id"], "acme");

        // A fresh organization reads as zero without being written.
        let (_, body) = json_of(
            http.get(t.rest("/credits/balance"))
                .bearer_auth(t.token(Role::User, "new-org"))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(body["data"]["balance"], json!(0));
        let (_, info) = json_of(
            http.get(t.rest("/user/credits/info"))
                .bearer_auth(t.token(Role::User, "new-org"))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(info["allow_usage"], false);

        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn credits_not_enabled_outside_the_credits_system() -> R {
    let t = TestServer::start_with(
        Backend::Sqlite,
        &[("SUBSCRIPTION_SYSTEM", "seats")],
        Arc::new(billing::clock::SystemClock),
    )
    .await;
    let user = t.token(Role::User, "acme");
    for path in [
        "/credits/balance",
        "/credits/transactions",
        "/credits/stats/monthly",
    ] {
        let (status, body) =
            json_of(t.http.get(t.rest(path)).bearer_auth(&user).send().await?).await?;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("CREDITS_NOT_ENABLED")),
            "{path}"
        );
    }
    // Public catalog reads still answer.
    assert_eq!(
        t.http.get(t.rest("/credits/packs")).send().await?.status(),
        200
    );
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn manual_adjustments_are_idempotent_and_audited() -> R {
    use billing::entities::admin_audit;
    use sea_orm::EntityTrait;
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let mut c = Clients::new(&t).await;
        let request = pb::ManualAdjustRequest {
            org_id: "acme".into(),
            amount_micros: 7 * CREDIT,
            reason: "support ticket 42".into(),
            expires_at: None,
            idempotency_key: Some("ticket-42".into()),
        };
        let first = c
            .admin
            .manual_adjust(authed(&c.admin_token, request.clone()))
            .await?
            .into_inner();
        let again = c
            .admin
            .manual_adjust(authed(&c.admin_token, request.clone()))
            .await?
            .into_inner();
        assert_eq!(
            (
                again.transaction_id.as_str(),
                again.duplicate,
                again.balance_micros
            ),
            (first.transaction_id.as_str(), true, 7 * CREDIT)
        );
        let mut changed = request;
        changed.amount_micros = 8 * CREDIT;
        let err = c
            .admin
            .manual_adjust(authed(&c.admin_token, changed))
            .await
            .expect_err("reused");
        assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");
        let debit = pb::ManualAdjustRequest {
            org_id: "acme".into(),
            amount_micros: -2 * CREDIT,
            reason: "correction".into(),
            ..Default::default()
        };
        assert_eq!(
            c.admin
                .manual_adjust(authed(&c.admin_token, debit))
                .await?
                .into_inner()
                .balance_micros,
            5 * CREDIT
        );

        let audits = admin_audit::Entity::find().all(&t.server.state.db).await?;
        assert_eq!(
            audits.len(),
            2,
            "one audit row per write, none for the replay"
        );
        assert!(
            audits
                .iter()
                .all(|a| a.actor_sub == "admin-1" && a.target_org.as_deref() == Some("acme"))
        );
        assert!(audits.iter().any(|a| a.reason == "support ticket 42"));
        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn amounts_and_balances_stay_within_bounds() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let admin = t.token(Role::Admin, "ops");
        let post = |body: Value| {
            t.http
                .post(t.rest("/admin/credits/manual"))
                .bearer_auth(&admin)
                .json(&body)
                .send()
        };
        // Past the largest single amount: refused, nothing written.
        for amount in [
            json!(9223372036854i64),
            json!(1000000000001i64),
            json!(-9223372036854i64),
        ] {
            let (status, body) =
                json_of(post(json!({"org_id": "big", "amount": amount, "reason": "x"})).await?)
                    .await?;
            assert_eq!(
                (status, body["error_code"].as_str(), body["field"].as_str()),
                (400, Some("INVALID_ARGUMENT"), Some("amount")),
                "{amount}: {body}"
            );
        }
        // Up to the bound is fine; one credit more is refused and the
        // organization goes on taking writes.
        let (status, _) = json_of(
            post(json!({"org_id": "big", "amount": 1000000000000i64, "reason": "x"})).await?,
        )
        .await?;
        assert_eq!(status, 200);
        let (status, body) =
            json_of(post(json!({"org_id": "big", "amount": 1, "reason": "x"})).await?).await?;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("amount")),
            "{body}"
        );
        let (status, body) =
            json_of(post(json!({"org_id": "big", "amount": -1, "reason": "x"})).await?).await?;
        assert_eq!(status, 200, "{body}");
        let (status, body) =
            json_of(post(json!({"org_id": "big", "amount": 1, "reason": "x"})).await?).await?;
        assert_eq!(
            (status, body["data"]["balance"].clone()),
            (200, json!(1000000000000i64)),
            "{body}"
        );
        // A grant whose expiry has passed is refused too.
        let (status, body) = json_of(
            post(json!({"org_id": "big", "amount": 1, "reason": "x",
                        "expires_at": "2020-01-01T00:00:00Z"}))
            .await?,
        )
        .await?;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("expires_at")),
            "{body}"
        );
        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn holds_outliving_their_lots_and_committed_holds_as_consumption() -> R {
    for backend in backends() {
        let clock = ManualClock::new(Utc::now());
        let t = TestServer::start_with(backend, &[], Arc::new(clock.clone())).await;
        let mut c = Clients::new(&t).await;
        let user = t.token(Role::User, "acme");
        let now = clock.now();
        c.grant("acme", 10 * CREDIT, Some(TimeDelta::seconds(5)), now)
            .await;
        let mut holds = Vec::new();
        for (n, credits) in [6, 4].into_iter().enumerate() {
            let hold = c
                .usage
                .reserve(authed(
                    &c.service,
                    pb::ReserveRequest {
                        org_id: "acme".into(),
                        amount_micros: Some(credits * CREDIT),
                        ttl_seconds: Some(600),
                        idempotency_key: format!("h{n}"),
                        ..Default::default()
                    },
                ))
                .await?
                .into_inner();
            holds.push(hold.reservation_id);
        }
        clock.advance(TimeDelta::seconds(10));

        // The lot has expired under both holds: nothing is stored, so
        // nothing is shown as held, and the balance is not negative.
        let (_, body) = json_of(
            t.http
                .get(t.rest("/credits/balance"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(
            (
                &body["data"]["balance"],
                &body["data"]["stored"],
                &body["data"]["realtime"]
            ),
            (&json!(0), &json!(0), &json!(0)),
            "{body}"
        );
        // Commit never fails for lack of credits: it charges what is left
        // (nothing) and reports the rest as shortfall.
        let commit = |id: &str, tokens: i64| pb::CommitRequest {
            reservation_id: id.into(),
            meter: "ai_tokens".into(),
            quantity: tokens,
            ..Default::default()
        };
        let done = c
            .usage
            .commit(authed(&c.service, commit(&holds[0], 3_000_000)))
            .await?
            .into_inner();
        assert_eq!(
            (
                done.charged_micros,
                done.shortfall_micros,
                done.balance_micros
            ),
            (0, 6 * CREDIT, 0)
        );
        // New credits: the remaining hold is charged from them first.
        c.grant("acme", 3 * CREDIT, None, clock.now()).await;
        let done = c
            .usage
            .commit(authed(&c.service, commit(&holds[1], 2_500_000)))
            .await?
            .into_inner();
        assert_eq!(
            (
                done.charged_micros,
                done.shortfall_micros,
                done.balance_micros
            ),
            (3 * CREDIT, 2 * CREDIT, 0)
        );
        let err = c
            .usage
            .commit(authed(&c.service, commit(&holds[1], 1)))
            .await
            .expect_err("finished");
        assert_eq!(
            finish_of(&err),
            [
                ("status", "committed".to_owned()),
                ("transaction_id", done.transaction_id.clone()),
                ("charged_micros", (3 * CREDIT).to_string()),
            ]
        );

        // A committed hold is consumption of its meter, in the balance and
        // in the monthly statistics.
        let (_, body) = json_of(
            t.http
                .get(t.rest("/credits/balance"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(
            (
                &body["data"]["consumption"]["ai_tokens"],
                &body["data"]["consumption"]["total"]
            ),
            (&json!(3), &json!(3)),
            "{body}"
        );
        let (_, body) = json_of(
            t.http
                .get(t.rest("/credits/stats/monthly?months=1"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        let month = &body["data"][0];
        assert_eq!(
            (
                &month["consumption"],
                &month["grants"],
                &month["adjustments"],
                &month["balance"]
            ),
            (&json!(3), &json!(13), &json!(-10), &json!(0)),
            "{body}"
        );
        invariants::check(&t.server.state.db, clock.now()).await;
        t.stop().await;
    }
    Ok(())
}

/// Idempotency records (every keyed method but `Consume`) are pruned
/// after their retention, and a key replayed later is a new request. A
/// `Consume`'s key lives on its ledger row, which is never pruned: it
/// replays for as long as the ledger exists.
#[tokio::test]
async fn idempotency_records_are_pruned_after_their_retention() -> R {
    use billing::ledger::sweeper;
    for backend in backends() {
        let clock = ManualClock::new(Utc::now());
        let t = TestServer::start_with(backend, &[], Arc::new(clock.clone())).await;
        let mut c = Clients::new(&t).await;
        c.grant("acme", 10 * CREDIT, None, clock.now()).await;
        let adjust = |key: &str| pb::ManualAdjustRequest {
            org_id: "acme".into(),
            amount_micros: CREDIT,
            reason: "keyed grant".into(),
            expires_at: None,
            idempotency_key: Some(key.into()),
        };
        let token = c.admin_token.clone();
        let granted = c
            .admin
            .manual_adjust(authed(&token, adjust("g")))
            .await?
            .into_inner();
        let consumed = c.consume("acme", "ai_tokens", 500_000, "p").await?;
        let replayed = c
            .admin
            .manual_adjust(authed(&token, adjust("g")))
            .await?
            .into_inner();
        assert!(replayed.duplicate);
        assert!(
            c.consume("acme", "ai_tokens", 500_000, "p")
                .await?
                .duplicate
        );
        let ledger = &t.server.state.ledger;
        assert_eq!(sweeper::prune_idempotency(ledger).await?, 0, "still kept");
        clock.advance(sweeper::IDEMPOTENCY_RETENTION + TimeDelta::seconds(1));
        assert_eq!(
            sweeper::prune_idempotency(ledger).await?,
            1,
            "{backend:?}: the adjustment's record, and nothing of the Consume"
        );
        // Past the retention the adjustment's key is a new request…
        let again = c
            .admin
            .manual_adjust(authed(&token, adjust("g")))
            .await?
            .into_inner();
        assert!(!again.duplicate);
        assert_ne!(again.transaction_id, granted.transaction_id);
        // …and the Consume's still answers as itself.
        let consumed_again = c.consume("acme", "ai_tokens", 500_000, "p").await?;
        assert!(consumed_again.duplicate, "{backend:?}");
        assert_eq!(consumed_again.transaction_id, consumed.transaction_id);
        assert_eq!(consumed_again.balance_micros, consumed.balance_micros);
        // 10 granted, the adjustment twice, one charge of 1 credit.
        assert_eq!(c.balance(&t, "acme").await.balance_micros, 11 * CREDIT);
        invariants::check(&t.server.state.db, clock.now()).await;
        t.stop().await;
    }
    Ok(())
}

/// Pruning takes old records a chunk at a time, by age, until none is
/// left, and leaves the young ones.
#[tokio::test]
async fn idempotency_pruning_goes_chunk_by_chunk() -> R {
    use billing::{entities::idempotency_record, ledger::sweeper};
    use sea_orm::{EntityTrait, PaginatorTrait, Set};
    for backend in backends() {
        let now = Utc::now();
        let t = TestServer::start(backend).await;
        let ledger = &t.server.state.ledger;
        let org = ledger.ensure_org("acme").await?;
        let old = now - sweeper::IDEMPOTENCY_RETENTION - TimeDelta::hours(1);
        // 2,500 expired records over 250 instants, and 10 young ones.
        let records = (0..2510).map(|i| idempotency_record::ActiveModel {
            org_id: Set(org),
            method: Set("Consume".into()),
            key: Set(format!("k{i}")),
            request_hash: Set("h".into()),
            response: Set("{}".into()),
            created_at: Set(if i < 2500 {
                old + TimeDelta::seconds(i / 10)
            } else {
                now
            }),
        });
        for chunk in records.collect::<Vec<_>>().chunks(500) {
            idempotency_record::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&t.server.state.db)
                .await?;
        }
        assert_eq!(
            sweeper::prune_idempotency(ledger).await?,
            2500,
            "{backend:?}"
        );
        assert_eq!(
            idempotency_record::Entity::find()
                .count(&t.server.state.db)
                .await?,
            10
        );
        t.stop().await;
    }
    Ok(())
}

/// The migrations that key allocations and idempotency records by what
/// they name, that make a `Consume`'s ledger row its idempotency record
/// and that trade the ledger's foreign keys for append-only guards, keep
/// every row, undone and done again. Undone, the ledger rows' keys become
/// records; done again, those records (as any record from before) are
/// still honoured, so a key recorded before them still replays.
#[tokio::test]
async fn key_migrations_keep_rows_and_keys_both_ways() -> R {
    use migration::MigratorTrait as _;
    use sea_orm::{EntityTrait, PaginatorTrait};
    async fn counts(conn: &sea_orm::DatabaseConnection) -> Result<(u64, u64), sea_orm::DbErr> {
        use billing::entities::{idempotency_record, lot_allocation};
        Ok((
            lot_allocation::Entity::find().count(conn).await?,
            idempotency_record::Entity::find().count(conn).await?,
        ))
    }
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let mut c = Clients::new(&t).await;
        c.grant("acme", 10 * CREDIT, None, Utc::now()).await;
        let first = c.consume("acme", "ai_tokens", 500_000, "k1").await?;
        c.consume("acme", "ai_tokens", 500_000, "k2").await?;
        drop(c);
        let TestServer { server, db, .. } = t;
        server.shutdown().await?;

        let conn = billing::db::connect(&db.url).await?;
        let before = counts(&conn).await?;
        assert_eq!(
            before,
            (3, 0),
            "{backend:?}: three lot moves, keys on ledger rows"
        );
        migration::Migrator::down(&conn, Some(3)).await?;
        let records = (3, 2);
        assert_eq!(counts(&conn).await?, records, "{backend:?}: down");
        migration::Migrator::up(&conn, None).await?;
        assert_eq!(counts(&conn).await?, records, "{backend:?}: up again");
        conn.close().await?;

        let t = TestServer::start_in(backend, db, &[], Arc::new(billing::clock::SystemClock)).await;
        let mut c = Clients::new(&t).await;
        let again = c.consume("acme", "ai_tokens", 500_000, "k1").await?;
        assert!(again.duplicate, "{backend:?}");
        assert_eq!(again.transaction_id, first.transaction_id);
        assert_eq!(again.balance_micros, first.balance_micros);
        let reused = c
            .consume("acme", "ai_tokens", 400_000, "k2")
            .await
            .expect_err("a reused key with other parameters");
        assert_eq!(reused.code(), tonic::Code::AlreadyExists, "{backend:?}");
        // A key of a record, not of a ledger row, replays in a warm
        // (unlocked) batch too: the balance shows the one charge.
        for _ in 0..3 {
            assert!(
                c.consume("acme", "ai_tokens", 500_000, "k1")
                    .await?
                    .duplicate
            );
        }
        c.consume("acme", "ai_tokens", 500_000, "k3").await?;
        assert!(
            c.consume("acme", "ai_tokens", 500_000, "k1")
                .await?
                .duplicate
        );
        assert!(
            c.consume("acme", "ai_tokens", 500_000, "k3")
                .await?
                .duplicate
        );
        // 10 granted, k1, k2 and k3 charged once each.
        assert_eq!(c.balance(&t, "acme").await.balance_micros, 7 * CREDIT);
        if matches!(backend, Backend::Postgres) {
            // A replica of the previous release, during a rolling upgrade,
            // records `Consume` keys in the records table: it cannot record
            // one that a ledger row holds (its write fails, charging
            // nothing), and records any other as before.
            use sea_orm::ConnectionTrait;
            let record = |key: &str| {
                format!(
                    "INSERT INTO idempotency_records (org_id, method, key, request_hash, response, created_at) \
                     SELECT id, 'consume', '{key}', 'h', '{{}}', now() FROM organizations WHERE external_id = 'acme'"
                )
            };
            let db = &t.server.state.db;
            let refused = db
                .execute_unprepared(&record("k3"))
                .await
                .expect_err("a key a ledger row holds");
            assert!(
                refused.to_string().contains("already recorded"),
                "{refused}"
            );
            db.execute_unprepared(&record("k9")).await?;
        }
        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

/// On PostgreSQL the ledger is append-only and nothing it refers to goes
/// away: the database refuses to change or delete ledger rows and lot
/// allocations, to delete organizations or credit lots, or to change their
/// ids (the guards that replace the foreign keys of the two hottest
/// tables). SQLite keeps its foreign keys.
#[tokio::test]
async fn the_ledger_is_append_only_and_what_it_names_stays() -> R {
    use sea_orm::ConnectionTrait;
    for backend in backends() {
        if !matches!(backend, Backend::Postgres) {
            continue;
        }
        let t = TestServer::start(backend).await;
        let mut c = Clients::new(&t).await;
        c.grant("acme", 10 * CREDIT, None, Utc::now()).await;
        c.consume("acme", "ai_tokens", 500_000, "k1").await?;
        let db = &t.server.state.db;
        for sql in [
            "UPDATE ledger_transactions SET amount_micros = 0",
            "DELETE FROM ledger_transactions",
            "TRUNCATE ledger_transactions CASCADE",
            "UPDATE lot_allocations SET amount_micros = 0",
            "DELETE FROM lot_allocations",
            "TRUNCATE lot_allocations",
            "DELETE FROM organizations WHERE external_id = 'acme'",
            "TRUNCATE organizations CASCADE",
            "UPDATE organizations SET id = id + 1000",
            "DELETE FROM credit_lots",
            "TRUNCATE credit_lots CASCADE",
            "UPDATE credit_lots SET id = id + 1000",
        ] {
            let refused = db.execute_unprepared(sql).await.expect_err(sql);
            assert!(
                refused.to_string().contains("is refused"),
                "{sql}: {refused}"
            );
        }
        // What the service itself updates still goes through.
        c.consume("acme", "ai_tokens", 500_000, "k2").await?;
        assert_eq!(c.balance(&t, "acme").await.balance_micros, 8 * CREDIT);
        invariants::check(db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn organizations_can_be_created_outside_the_writer() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let ledger = &t.server.state.ledger;
        let id = ledger.ensure_org("new-org").await?;
        assert_eq!(ledger.ensure_org("new-org").await?, id, "created once");
        assert_eq!(ledger.org_id("new-org").await?, Some(id));
        let mut c = Clients::new(&t).await;
        assert_eq!(
            c.grant("new-org", 2 * CREDIT, None, Utc::now()).await,
            2 * CREDIT
        );
        invariants::check(&t.server.state.db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}

/// The background sweep goes on past an organization whose sweep fails,
/// logging it: here one whose stored row was corrupted so that booking its
/// expiry would take its balance below zero, which the database refuses.
/// The other organization is swept all the same.
#[tokio::test]
async fn the_sweep_goes_on_past_an_organization_that_fails() -> R {
    use sea_orm::ConnectionTrait;
    for backend in backends() {
        let clock = ManualClock::new(Utc::now());
        let t = TestServer::start_with(backend, &[], Arc::new(clock.clone())).await;
        let mut c = Clients::new(&t).await;
        let now = clock.now();
        // "broken" first, so it is swept first (by row id).
        for org in ["broken", "fine"] {
            c.grant(org, 2 * CREDIT, Some(TimeDelta::minutes(5)), now)
                .await;
        }
        t.server
            .state
            .db
            .execute_unprepared(
                "UPDATE organizations SET balance_micros = 0 WHERE external_id = 'broken'",
            )
            .await?;
        clock.advance(TimeDelta::minutes(10));
        let swept = billing::ledger::sweeper::sweep_all(&t.server.state.ledger).await?;
        assert_eq!(
            swept, 1,
            "{backend:?}: only the sound organization is swept"
        );
        let rows = invariants::rows_by_org(&t.server.state.db).await;
        assert!(rows["fine"].iter().any(|r| r.kind == "expiry"));
        assert!(!rows["broken"].iter().any(|r| r.kind == "expiry"));
        assert_eq!(c.balance(&t, "fine").await.stored_micros, 0);
        t.stop().await;
    }
    Ok(())
}

/// The seams payments build on: a `pending` lot that settles once or is
/// voided, credits taken back from one lot at most once per key and never
/// below zero, repeated calls answering the first one's transaction, and
/// side writes that commit with the credits or roll them back.
#[tokio::test]
async fn payment_seams_settle_void_and_take_back_exactly_once() -> R {
    use billing::ledger::{GrantInput, LotKind, SettleInput, SideWrite, TakeBackInput, VoidInput};
    use sea_orm::Statement;
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let ledger = &t.server.state.ledger;
        let db = &t.server.state.db;
        let org = "buyer";
        let pending = |order: &str, then: Vec<SideWrite>| GrantInput {
            org: org.into(),
            entry_kind: "purchase",
            lot_kind: LotKind::Pending,
            amount: 100 * CREDIT,
            expires_at: None,
            source_type: "order".into(),
            source_id: Some(order.into()),
            description: "pack".into(),
            then,
        };
        let settle = |order: &str| SettleInput {
            org: org.into(),
            entry_kind: "purchase",
            lot_kind: LotKind::TopUp,
            amount: 100 * CREDIT,
            expires_at: Some(Utc::now() + TimeDelta::days(365)),
            source_type: "order".into(),
            source_id: order.into(),
            description: "pack".into(),
            then: Vec::new(),
        };
        let take = |key: &str, amount: i64| TakeBackInput {
            org: org.into(),
            source_type: "order".into(),
            source_id: "o1".into(),
            amount,
            key: key.into(),
            description: "refund".into(),
            then: Vec::new(),
        };

        // A pending lot: shown, not part of the balance; granted once.
        let g = ledger.grant(pending("o1", Vec::new())).await?;
        assert_eq!((g.transaction_id.as_str(), g.duplicate), ("", false));
        assert!(ledger.grant(pending("o1", Vec::new())).await?.duplicate);
        // A later grant of the same source saying something else (another
        // amount or expiry, read at another moment) is a duplicate too.
        let mut other = pending("o1", Vec::new());
        other.amount = 7 * CREDIT;
        other.expires_at = Some(Utc::now());
        assert!(ledger.grant(other).await?.duplicate);
        let mut c = Clients::new(&t).await;
        assert_eq!(c.balance(&t, org).await.stored_micros, 0);

        // Settling books it once; a repeat answers the same transaction.
        let s = ledger.settle(settle("o1")).await?;
        assert_eq!(s.settled_micros, 100 * CREDIT);
        assert!(!s.transaction_id.is_empty());
        let again = ledger.settle(settle("o1")).await?;
        assert!(again.duplicate);
        assert_eq!(again.transaction_id, s.transaction_id);
        assert_eq!(c.balance(&t, org).await.stored_micros, 100 * CREDIT);

        // Settling a source with no lot yet grants it (payment confirmed
        // before the checkout event arrived); the late pending grant is
        // then a duplicate and adds nothing.
        let fresh = ledger.settle(settle("o3")).await?;
        assert_eq!(fresh.settled_micros, 100 * CREDIT);
        assert!(ledger.grant(pending("o3", Vec::new())).await?.duplicate);
        assert_eq!(c.balance(&t, org).await.stored_micros, 200 * CREDIT);

        // Taking back: once per key, from that lot only, never below what
        // it has left.
        let r1 = ledger.take_back(take("r1", 30 * CREDIT)).await?;
        assert_eq!(r1.taken_micros, 30 * CREDIT);
        let r1_again = ledger.take_back(take("r1", 30 * CREDIT)).await?;
        assert!(r1_again.duplicate);
        assert_eq!(r1_again.transaction_id, r1.transaction_id);
        let r2 = ledger.take_back(take("r2", 1000 * CREDIT)).await?;
        assert_eq!(r2.taken_micros, 70 * CREDIT, "only what the lot has left");
        let r3 = ledger.take_back(take("r3", CREDIT)).await?;
        assert_eq!((r3.taken_micros, r3.transaction_id.as_str()), (0, ""));
        assert_eq!(c.balance(&t, org).await.stored_micros, 100 * CREDIT);

        // A failed payment: the pending lot goes, and cannot settle later.
        ledger.grant(pending("o2", Vec::new())).await?;
        let v = ledger
            .void(VoidInput {
                org: org.into(),
                source_type: "order".into(),
                source_id: "o2".into(),
                then: Vec::new(),
            })
            .await?;
        assert_eq!(v.voided_micros, 100 * CREDIT);
        assert_eq!(ledger.settle(settle("o2")).await?.settled_micros, 0);
        assert_eq!(c.balance(&t, org).await.stored_micros, 100 * CREDIT);

        // A side write whose guard fails rolls the credits back with it;
        // one that holds commits with them.
        let backend_of = db.get_database_backend();
        let touch = |n: i64| SideWrite {
            statement: Statement::from_string(
                backend_of,
                format!("UPDATE organizations SET updated_at = updated_at WHERE id = {n}"),
            ),
            expect_rows: Some(1),
        };
        let refused = ledger.grant(pending("o4", vec![touch(-1)])).await;
        assert!(
            matches!(refused, Err(billing::Error::Unavailable(_))),
            "{refused:?}"
        );
        let org_id = ledger.org_id(org).await?.expect("org");
        let o4 = ledger.settle(SettleInput {
            then: vec![touch(org_id)],
            ..settle("o4")
        });
        assert_eq!(
            o4.await?.settled_micros,
            100 * CREDIT,
            "o4 never granted before"
        );
        let rows = invariants::rows_by_org(db).await;
        let kinds: Vec<&str> = rows[org].iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["purchase", "purchase", "refund", "refund", "purchase"],
            "{backend:?}"
        );
        invariants::check(db, Utc::now()).await;
        t.stop().await;
    }
    Ok(())
}
