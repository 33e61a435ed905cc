//! Buying packs through a local fake Stripe (the real `async-stripe`
//! client pointed at it) and paying for them with events signed exactly as
//! Stripe signs them: the purchase rules, the order, the checkout, and
//! webhooks that take effect once whatever the replays, the order of
//! arrival and the concurrency.

#![allow(
    clippy::unwrap_used,
    reason = "a failed step of a test should panic there"
)]

mod common;

use std::sync::Arc;

use billing::{
    auth::Role,
    clock::{Clock, ManualClock},
    entities::subscription,
    payments::stripe::signature,
};
use chrono::{TimeDelta, Utc};
use common::{
    Backend, TestServer, backends,
    fake_stripe::{FakeStripe, Mode},
    invariants, json_of,
};
use sea_orm::{ActiveValue::Set, EntityTrait};
use serde_json::{Value, json};

type R = Result<(), Box<dyn std::error::Error>>;
const CREDIT: i64 = 1_000_000;
const WHSEC: &str = "whsec_test_secret";

struct Shop {
    t: TestServer,
    /// More replicas on the same database (PostgreSQL), same settings.
    replicas: Vec<billing::RunningServer>,
    clock: ManualClock,
    stripe: FakeStripe,
    events: std::sync::atomic::AtomicU64,
}

impl Shop {
    async fn open(backend: Backend) -> Self {
        Self::open_with(backend, 1, &[]).await
    }

    /// `replicas` servers on one database, with `env` beyond Stripe's.
    async fn open_with(backend: Backend, replicas: usize, env: &[(&str, &str)]) -> Self {
        let (stripe, base) = FakeStripe::start().await;
        let clock = ManualClock::new(Utc::now());
        let mut vars = vec![
            ("STRIPE_SECRET_KEY", "sk_test_fake"),
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
            ("STRIPE_API_BASE", base.as_str()),
        ];
        vars.extend_from_slice(env);
        let t = TestServer::start_with(backend, &vars, Arc::new(clock.clone())).await;
        let mut others = Vec::new();
        for _ in 1..replicas {
            others.push(common::start_on(&t.db.url, &vars, Arc::new(clock.clone())).await);
        }
        Self {
            t,
            replicas: others,
            clock,
            stripe,
            events: Default::default(),
        }
    }

    /// The REST address of replica `i` (0 is `t`).
    fn rest_on(&self, i: usize, path: &str) -> String {
        match i % (self.replicas.len() + 1) {
            0 => self.t.rest(path),
            n => format!("http://{}{path}", self.replicas[n - 1].http_addr),
        }
    }

    async fn buy_on(&self, i: usize, org: &str, body: Value) -> (u16, Value) {
        self.post_on(i, org, "/credits/packs/buy", body).await
    }

    async fn post_on(&self, i: usize, org: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .t
            .http
            .post(self.rest_on(i, path))
            .bearer_auth(self.t.token(Role::User, org))
            .json(&body)
            .send()
            .await
            .unwrap();
        json_of(r).await.unwrap()
    }

    async fn deliver_on(&self, i: usize, body: &[u8]) -> u16 {
        let header = signature::sign(WHSEC, self.clock.now().timestamp(), body);
        let r = self
            .t
            .http
            .post(self.rest_on(i, "/payment/webhook/stripe"))
            .header("stripe-signature", header)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    async fn close(self) {
        for r in self.replicas {
            r.shutdown().await.unwrap();
        }
        self.t.stop().await;
    }

    /// Gives `org` an active subscription to `plan_id` for this month.
    async fn subscribe(&self, org: &str, plan_id: &str) {
        let org_id = self.t.server.state.ledger.ensure_org(org).await.unwrap();
        let now = self.clock.now();
        subscription::Entity::insert(subscription::ActiveModel {
            id: Set(format!("sub_{org}")),
            org_id: Set(org_id),
            plan_id: Set(plan_id.into()),
            status: Set("active".into()),
            billing_period: Set("monthly".into()),
            channel: Set("stripe".into()),
            provider_subscription_id: Set(Some(format!("sub_stripe_{org}"))),
            current_period_start: Set(Some(now - TimeDelta::days(1))),
            current_period_end: Set(Some(now + TimeDelta::days(29))),
            cancel_at_period_end: Set(false),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .exec_without_returning(&self.t.server.state.db)
        .await
        .unwrap();
    }

    async fn post(&self, org: &str, path: &str, body: Value) -> (u16, Value) {
        self.post_on(0, org, path, body).await
    }

    async fn buy(&self, org: &str, body: Value) -> (u16, Value) {
        self.buy_on(0, org, body).await
    }

    async fn get(&self, org: &str, path: &str) -> (u16, Value) {
        let r = self
            .t
            .http
            .get(self.t.rest(path))
            .bearer_auth(self.t.token(Role::User, org))
            .send()
            .await
            .unwrap();
        json_of(r).await.unwrap()
    }

    /// A new event of `kind` about `object` (a fresh id each time).
    fn event(&self, kind: &str, object: Value) -> Vec<u8> {
        let n = self
            .events
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        serde_json::to_vec(&json!({
            "id": format!("evt_{n}"), "object": "event", "type": kind,
            "api_version": "2025-09-30.clover", "created": self.clock.now().timestamp(),
            "livemode": false, "pending_webhooks": 1,
            "data": {"object": object},
        }))
        .unwrap()
    }

    async fn deliver_signed(&self, body: &[u8], header: &str) -> (u16, Value) {
        let r = self
            .t
            .http
            .post(self.t.rest("/payment/webhook/stripe"))
            .header("stripe-signature", header)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        json_of(r).await.unwrap()
    }

    async fn deliver(&self, body: &[u8]) -> u16 {
        self.deliver_on(0, body).await
    }

    /// A new event of `kind` about `object`, delivered once: its status.
    async fn send(&self, kind: &str, object: Value) -> u16 {
        self.deliver(&self.event(kind, object)).await
    }

    async fn stored(&self, org: &str) -> f64 {
        let (_, b) = self.get(org, "/credits/balance").await;
        b["data"]["stored"].as_f64().unwrap()
    }
}

fn session(order: &str, org: &str, paid: &str, pi: &str) -> Value {
    json!({
        "id": format!("cs_for_{order}"), "object": "checkout.session",
        "client_reference_id": order, "mode": "payment", "payment_status": paid,
        "payment_intent": pi, "status": "complete",
        "metadata": {"order_id": order, "org_id": org},
    })
}

fn charge(pi: &str, refunded: i64) -> Value {
    json!({"id": format!("ch_{pi}"), "object": "charge", "payment_intent": pi,
           "amount": 1999, "amount_refunded": refunded, "refunded": refunded >= 1999})
}

#[tokio::test]
async fn a_pack_bought_and_paid_through_stripe_grants_once_and_refunds_exactly() -> R {
    for backend in backends() {
        let shop = Shop::open(backend).await;
        let org = "shopper";

        // No billing account yet; the free plan.
        let (status, body) = shop
            .post(
                org,
                "/subscription/portal",
                json!({"return_url": "https://app.test/account"}),
            )
            .await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("NO_BILLING_ACCOUNT"))
        );
        let mut subs = billing::pb::subscriptions_service_client::SubscriptionsServiceClient::new(
            shop.t.channel().await,
        );
        let token = shop.t.token(Role::User, org);
        let free = subs
            .get_subscription(common::authed(
                &token,
                billing::pb::GetSubscriptionRequest {},
            ))
            .await?
            .into_inner();
        assert!(free.subscription.is_none());
        assert_eq!(free.plan.map(|p| p.code).as_deref(), Some("SUB_BASE"));

        // The rules, before any attempt: no subscription, unknown pack.
        let (status, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (403, Some("SUBSCRIPTION_REQUIRED"))
        );
        shop.subscribe(org, "sub-starter").await;
        let (status, body) = shop.buy(org, json!({"packId": "pack-404"})).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (404, Some("PACK_NOT_FOUND"))
        );
        let (status, body) = shop
            .buy(org, json!({"packId": "pack-1", "success_url": "not a url"}))
            .await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("INVALID_ARGUMENT"))
        );

        // A checkout: the order, the customer, the session as the contract says.
        let (status, body) = shop
            .buy(
                org,
                json!({"packId": "pack-1", "success_url": "https://app.test/ok",
                       "cancel_url": "https://app.test/no"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let order = body["data"]["order_id"].as_str().unwrap().to_owned();
        assert!(
            body["data"]["checkout_url"]
                .as_str()
                .unwrap()
                .starts_with("https://")
        );
        let calls = shop.stripe.calls("/v1/checkout/sessions");
        assert_eq!(calls.len(), 1);
        let form = &calls[0].form;
        assert_eq!(form["client_reference_id"], order);
        assert_eq!(form["metadata[order_id]"], order);
        assert_eq!(form["metadata[org_id]"], org);
        assert_eq!(form["mode"], "payment");
        assert_eq!(form["customer"], "cus_1");
        assert_eq!(
            calls[0].idempotency_key.as_deref(),
            Some(format!("checkout-{order}").as_str())
        );
        assert_eq!(
            shop.stripe.calls("/v1/customers")[0].form["metadata[org_id]"],
            org
        );

        // The subscription and the portal of the customer just created.
        let sub = subs
            .get_subscription(common::authed(
                &token,
                billing::pb::GetSubscriptionRequest {},
            ))
            .await?
            .into_inner();
        assert_eq!(
            sub.subscription.map(|s| s.plan_code).as_deref(),
            Some("SUB_STARTER")
        );
        let (status, body) = shop
            .post(
                org,
                "/subscription/portal",
                json!({"return_url": "https://app.test/account"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["data"]["url"]
                .as_str()
                .unwrap()
                .starts_with("https://billing.stripe.test/")
        );
        let call = &shop.stripe.calls("/v1/billing_portal/sessions")[0];
        assert_eq!(call.form["customer"], "cus_1");
        assert_eq!(call.form["return_url"], "https://app.test/account");

        // A second attempt within the cooldown.
        let (status, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (429, Some("PURCHASE_COOLDOWN"))
        );
        assert_eq!(body["cooldown_seconds"], 10);
        assert!(
            body["retry_after"]
                .as_u64()
                .is_some_and(|s| (1..=10).contains(&s))
        );

        // The order is the caller's only.
        let (status, body) = shop.get(org, &format!("/orders/{order}")).await;
        assert_eq!(
            (status, body["data"]["status"].as_str()),
            (200, Some("pending"))
        );
        assert_eq!(body["data"]["amount"].as_f64(), Some(19.99));
        let (status, body) = shop.get("someone-else", &format!("/orders/{order}")).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (404, Some("ORDER_NOT_FOUND"))
        );
        let (_, list) = shop.get(org, "/orders").await;
        assert_eq!(list["pagination"]["total"], 1);

        // Bad, stale and missing signatures change nothing.
        let paid = shop.event(
            "checkout.session.completed",
            session(&order, org, "paid", "pi_1"),
        );
        let now = shop.clock.now().timestamp();
        for header in [
            signature::sign("whsec_wrong", now, &paid),
            signature::sign(WHSEC, now - 301, &paid),
            String::new(),
        ] {
            let (status, body) = shop.deliver_signed(&paid, &header).await;
            assert_eq!(
                (status, body["error_code"].as_str()),
                (400, Some("INVALID_SIGNATURE"))
            );
        }
        assert_eq!(shop.stored(org).await, 0.0);

        // Paid: delivered four times at once and once more later, plus a
        // second event for the same session: credits once.
        let deliveries = (0..4).map(|_| shop.deliver(&paid));
        for status in futures::future::join_all(deliveries).await {
            assert!(status == 200 || status == 503, "{status}");
        }
        assert_eq!(shop.deliver(&paid).await, 200);
        assert_eq!(
            shop.send(
                "checkout.session.completed",
                session(&order, org, "paid", "pi_1")
            )
            .await,
            200
        );
        assert_eq!(shop.stored(org).await, 100.0);
        let (_, body) = shop.get(org, &format!("/orders/{order}")).await;
        assert_eq!(body["data"]["status"], "paid");
        assert!(body["data"]["paid_at"].is_string());
        let (_, info) = shop.get(org, "/user/credits/info").await;
        assert_eq!(info["credits"], 100);

        // Partial refunds add up (amount_refunded is cumulative), replays
        // take nothing more.
        for refunded in [1000, 1000, 1999, 1999] {
            assert_eq!(
                shop.send("charge.refunded", charge("pi_1", refunded)).await,
                200
            );
            // The refunded share of 100 credits, floored to the micro-credit.
            let taken = 100 * CREDIT * refunded / 1999;
            let expected = (100 * CREDIT - taken) as f64 / CREDIT as f64;
            assert_eq!(shop.stored(org).await, expected, "after {refunded}");
        }
        let (_, body) = shop.get(org, &format!("/orders/{order}")).await;
        assert_eq!(body["data"]["status"], "refunded");

        // Unknown event types are acknowledged.
        assert_eq!(shop.send("payout.paid", json!({"id": "po_1"})).await, 200);

        let rows = invariants::rows_by_org(&shop.t.server.state.db).await;
        let kinds: Vec<(&str, i64)> = rows[org]
            .iter()
            .map(|r| (r.kind.as_str(), r.amount_micros))
            .collect();
        let first = 100 * CREDIT * 1000 / 1999;
        assert_eq!(
            kinds,
            [
                ("purchase", 100 * CREDIT),
                ("refund", -first),
                ("refund", -(100 * CREDIT - first))
            ]
        );
        invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
        shop.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn delayed_payments_limits_and_provider_outages() -> R {
    for backend in backends() {
        let shop = Shop::open(backend).await;
        let org = "bank-payer";
        shop.subscribe(org, "sub-starter").await;
        let cooldown = || shop.clock.advance(TimeDelta::seconds(11));

        // A provider outage: 503 without provider text, no attempt counted,
        // and the retry reuses the open order (same idempotency key).
        shop.stripe.set_mode(Mode::Failing);
        let (status, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (503, Some("SERVICE_UNAVAILABLE"))
        );
        assert!(
            !body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("fake outage")
        );
        shop.stripe.set_mode(Mode::Normal);
        let (status, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        assert_eq!(status, 200, "{body}");
        let first = body["data"]["order_id"].as_str().unwrap().to_owned();
        let (_, list) = shop.get(org, "/orders").await;
        assert_eq!(
            list["pagination"]["total"], 1,
            "the failed attempt's order was reused"
        );

        // Completed but unpaid (a bank debit): pending, not spendable;
        // then the payment succeeds, twice.
        assert_eq!(
            shop.send(
                "checkout.session.completed",
                session(&first, org, "unpaid", "pi_a")
            )
            .await,
            200
        );
        assert_eq!(shop.stored(org).await, 0.0);
        let (_, info) = shop.get(org, "/user/credits/info").await;
        assert!(
            info["breakdown"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["purchase_kind"] == "Pending"),
            "{info}"
        );
        for _ in 0..2 {
            assert_eq!(
                shop.send(
                    "checkout.session.async_payment_succeeded",
                    session(&first, org, "paid", "pi_a")
                )
                .await,
                200
            );
        }
        assert_eq!(shop.stored(org).await, 100.0);

        // A second delayed payment that fails: its pending credits go.
        cooldown();
        let (_, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        let second = body["data"]["order_id"].as_str().unwrap().to_owned();
        assert_eq!(
            shop.send(
                "checkout.session.completed",
                session(&second, org, "unpaid", "pi_b")
            )
            .await,
            200
        );
        assert_eq!(
            shop.send(
                "checkout.session.async_payment_failed",
                session(&second, org, "unpaid", "pi_b")
            )
            .await,
            200
        );
        // A success arriving after the failure cannot revive it.
        assert_eq!(
            shop.send(
                "checkout.session.async_payment_succeeded",
                session(&second, org, "paid", "pi_b")
            )
            .await,
            200
        );
        assert_eq!(shop.stored(org).await, 100.0);
        let (_, body) = shop.get(org, &format!("/orders/{second}")).await;
        assert_eq!(
            body["data"]["status"], "paid",
            "the money did arrive in the end"
        );

        // An expired checkout; then the per-cycle limit (3 paid or open).
        cooldown();
        let (_, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        let third = body["data"]["order_id"].as_str().unwrap().to_owned();
        assert_eq!(
            shop.send(
                "checkout.session.expired",
                session(&third, org, "unpaid", "")
            )
            .await,
            200
        );
        let (_, body) = shop.get(org, &format!("/orders/{third}")).await;
        assert_eq!(body["data"]["status"], "expired");
        cooldown();
        let (status, _) = shop.buy(org, json!({"packId": "pack-1"})).await;
        assert_eq!(status, 200, "expired orders do not count");
        cooldown();
        let (status, body) = shop.buy(org, json!({"packId": "pack-1"})).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (409, Some("PACK_LIMIT_REACHED"))
        );
        cooldown();
        let (status, _) = shop.buy(org, json!({"packId": "pack-2"})).await;
        assert_eq!(status, 200, "the limit is per pack");

        // A hung provider answers 503 within the call deadline and does not
        // block other calls meanwhile.
        cooldown();
        shop.stripe.set_mode(Mode::Hanging);
        let hung = shop.buy(org, json!({"packId": "pack-3"}));
        let other = async {
            let (status, _) = shop.get(org, "/orders").await;
            status
        };
        let (hung, other) = tokio::join!(hung, other);
        assert_eq!(other, 200);
        assert_eq!(hung.0, 503);

        invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
        shop.close().await;
    }
    Ok(())
}

/// Purchases and webhooks racing across two replicas of one PostgreSQL:
/// the cooldown and the per-cycle limit hold, and a payment and its
/// refunds, each delivered several times to both replicas at once and in
/// any order, take effect once (a delivery that met a concurrent one may
/// answer 503; the provider's retry, done here, then succeeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchases_and_webhooks_race_across_replicas() -> R {
    if !backends().contains(&Backend::Postgres) {
        return Ok(());
    }
    // The cooldown: of 8 simultaneous attempts, one gets through.
    let shop = Shop::open_with(Backend::Postgres, 2, &[]).await;
    shop.subscribe("racer", "sub-starter").await;
    let attempts = (0..8).map(|i| shop.buy_on(i, "racer", json!({"packId": "pack-1"})));
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
    shop.close().await;

    // The limit, with no cooldown: of 8 simultaneous purchases, 3.
    let shop = Shop::open_with(Backend::Postgres, 2, &[("PURCHASE_COOLDOWN_SECONDS", "0")]).await;
    let org = "collector";
    shop.subscribe(org, "sub-starter").await;
    let attempts = (0..8).map(|i| shop.buy_on(i, org, json!({"packId": "pack-1"})));
    let answers = futures::future::join_all(attempts).await;
    let orders: Vec<String> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b["data"]["order_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(orders.len(), 3, "{answers:?}");
    assert!(
        answers.iter().all(|(s, _)| *s == 200 || *s == 409),
        "{answers:?}"
    );

    // Pay all three, refund the first in two steps: every event four
    // times, to both replicas, shuffled, all at once.
    let mut events = Vec::new();
    for (n, order) in orders.iter().enumerate() {
        let pi = format!("pi_race_{n}");
        events.push(shop.event(
            "checkout.session.completed",
            session(order, org, "paid", &pi),
        ));
    }
    let refunds = [
        shop.event("charge.refunded", charge("pi_race_0", 1000)),
        shop.event("charge.refunded", charge("pi_race_0", 1999)),
    ];
    let mut deliveries: Vec<(usize, &[u8])> = Vec::new();
    for (k, e) in events.iter().enumerate() {
        for copy in 0..4 {
            deliveries.push((k + copy, e.as_slice()));
        }
    }
    use rand::{SeedableRng, seq::SliceRandom};
    deliveries.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let statuses =
        futures::future::join_all(deliveries.iter().map(|(i, e)| shop.deliver_on(*i, e))).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // Refunds race each other (and may arrive before their payment is
    // recorded; they are answered 503 then and come again).
    let mut pending: Vec<&[u8]> = refunds
        .iter()
        .flat_map(|r| [r.as_slice(), r.as_slice()])
        .collect();
    pending.extend(events.iter().map(Vec::as_slice));
    for _round in 0..10 {
        let statuses = futures::future::join_all(
            pending
                .iter()
                .enumerate()
                .map(|(i, e)| shop.deliver_on(i, e)),
        )
        .await;
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 503),
            "{statuses:?}"
        );
        pending = pending
            .into_iter()
            .zip(statuses)
            .filter(|(_, s)| *s != 200)
            .map(|(e, _)| e)
            .collect();
        if pending.is_empty() {
            break;
        }
    }
    assert!(pending.is_empty(), "every delivery succeeds once retried");
    assert_eq!(
        shop.stored(org).await,
        200.0,
        "three packs bought, one refunded in full"
    );
    let rows = invariants::rows_by_org(&shop.t.server.state.db).await;
    let purchases = rows[org].iter().filter(|r| r.kind == "purchase").count();
    let refunded: i64 = rows[org]
        .iter()
        .filter(|r| r.kind == "refund")
        .map(|r| -r.amount_micros)
        .sum();
    assert_eq!((purchases, refunded), (3, 100 * CREDIT));
    invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
    shop.close().await;
    Ok(())
}
