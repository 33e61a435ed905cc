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
    entities::{pack, plan},
    payments::{creem::signature as creem_signature, stripe::signature},
};
use chrono::{TimeDelta, Utc};
use common::{
    Backend, TestServer, backends,
    fake_creem::{self, FakeCreem},
    fake_stripe::{FakeStripe, Mode},
    invariants, json_of,
};
use sea_orm::{ActiveValue::Set, EntityTrait};
use serde_json::{Value, json};

type R = Result<(), Box<dyn std::error::Error>>;
const CREDIT: i64 = 1_000_000;
const WHSEC: &str = "whsec_test_secret";
const CREEM_WHSEC: &str = "creem_whsec_test";

struct Shop {
    t: TestServer,
    /// More replicas on the same database (PostgreSQL), same settings.
    replicas: Vec<billing::RunningServer>,
    clock: ManualClock,
    stripe: FakeStripe,
    creem: FakeCreem,
    events: std::sync::atomic::AtomicU64,
}

impl Shop {
    async fn open(backend: Backend) -> Self {
        Self::open_with(backend, 1, &[]).await
    }

    /// `replicas` servers on one database, with `env` beyond Stripe's.
    async fn open_with(backend: Backend, replicas: usize, env: &[(&str, &str)]) -> Self {
        let (stripe, base) = FakeStripe::start().await;
        let (creem, creem_base) = FakeCreem::start().await;
        let clock = ManualClock::new(Utc::now());
        let mut vars = vec![
            ("STRIPE_SECRET_KEY", "sk_test_fake"),
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
            ("STRIPE_API_BASE", base.as_str()),
            ("CREEM_API_KEY", fake_creem::API_KEY),
            ("CREEM_WEBHOOK_SECRET", CREEM_WHSEC),
            ("CREEM_API_BASE", creem_base.as_str()),
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
            creem,
            events: Default::default(),
        }
    }

    /// A user token for `org`, valid at the shop's clock (tests move it).
    fn token(&self, org: &str) -> String {
        let now = self.clock.now().timestamp();
        self.t.keys.issue("user-1", org, Role::User, now, 3600)
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
            .bearer_auth(self.token(org))
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
            provider_updated_at: Set(None),
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
            .bearer_auth(self.token(org))
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

    /// A new Creem event of `kind` about `object` (a fresh id each time).
    fn creem_event(&self, kind: &str, object: Value) -> Vec<u8> {
        let n = self
            .events
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        serde_json::to_vec(&json!({
            "id": format!("evt_creem_{n}"), "eventType": kind,
            "created_at": self.clock.now().timestamp_millis(), "object": object,
        }))
        .unwrap()
    }

    /// A Creem event of `kind` about `object`, signed as Creem signs, delivered once.
    async fn send_creem(&self, kind: &str, object: Value) -> u16 {
        self.deliver_creem(&self.creem_event(kind, object)).await
    }

    async fn deliver_creem(&self, body: &[u8]) -> u16 {
        self.deliver_creem_on(0, body).await
    }

    async fn deliver_creem_on(&self, i: usize, body: &[u8]) -> u16 {
        let r = self
            .t
            .http
            .post(self.rest_on(i, "/payment/webhook/creem"))
            .header("creem-signature", creem_signature::sign(CREEM_WHSEC, body))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    /// Sets the provider ids of a plan (as an operator would).
    async fn price_plan(&self, id: &str, stripe_monthly: Option<&str>, creem: Option<&str>) {
        plan::Entity::update(plan::ActiveModel {
            id: Set(id.into()),
            stripe_price_monthly: Set(stripe_monthly.map(str::to_owned)),
            creem_product_id: Set(creem.map(str::to_owned)),
            ..Default::default()
        })
        .exec(&self.t.server.state.db)
        .await
        .unwrap();
    }

    /// The caller's plan code as GetSubscription says, and whether a
    /// subscription is in force.
    async fn plan_of(&self, org: &str) -> (String, bool) {
        let mut subs = billing::pb::subscriptions_service_client::SubscriptionsServiceClient::new(
            self.t.channel().await,
        );
        let token = self.token(org);
        let r = subs
            .get_subscription(common::authed(
                &token,
                billing::pb::GetSubscriptionRequest {},
            ))
            .await
            .unwrap()
            .into_inner();
        let code = r.plan.map(|p| p.code).unwrap_or_default();
        (code, r.subscription.is_some())
    }

    /// `/user/credits/info`'s `active_subscription.id` and `credits`.
    async fn info(&self, org: &str) -> (String, i64) {
        let (_, info) = self.get(org, "/user/credits/info").await;
        (
            info["active_subscription"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            info["credits"].as_i64().unwrap_or(-1),
        )
    }

    /// A new event of `kind` about `object`, delivered once: its status.
    async fn send(&self, kind: &str, object: Value) -> u16 {
        self.deliver(&self.event(kind, object)).await
    }

    /// An admin token, valid at the shop's clock.
    fn admin_token(&self) -> String {
        let now = self.clock.now().timestamp();
        self.t.keys.issue("admin-1", "ops", Role::Admin, now, 3600)
    }

    /// Creates a coupon through the admin API; its answer.
    async fn coupon(&self, body: Value) -> Value {
        let r = self
            .t
            .http
            .post(self.t.rest("/admin/billing/coupons"))
            .bearer_auth(self.admin_token())
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, answer) = json_of(r).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        answer["data"].clone()
    }

    /// The admin API's `redeemed_count` of coupon `code`.
    async fn redeemed(&self, code: &str) -> i64 {
        let r = self
            .t
            .http
            .get(self.t.rest("/admin/billing/coupons"))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap();
        let (_, list) = json_of(r).await.unwrap();
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["code"] == code)
            .unwrap()["redeemed_count"]
            .as_i64()
            .unwrap()
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

/// A Stripe subscription object as the events and `GET /v1/subscriptions`
/// carry it (newer API: periods on the items).
fn stripe_sub(id: &str, org: &str, status: &str, price: &str, period: (i64, i64)) -> Value {
    json!({
        "id": id, "object": "subscription", "status": status, "customer": "cus_1",
        "cancel_at_period_end": false,
        "metadata": {"org_id": org, "plan_id": "sub-pro"},
        "items": {"object": "list", "data": [{
            "id": format!("si_{id}"), "object": "subscription_item",
            "price": {"id": price, "object": "price", "recurring": {"interval": "month"}},
            "current_period_start": period.0, "current_period_end": period.1,
        }]},
    })
}

fn stripe_invoice(
    id: &str,
    org: &str,
    order: Option<&str>,
    pi: &str,
    price: &str,
    period: Option<(i64, i64)>,
    reason: &str,
) -> Value {
    let mut lines = json!([]);
    if let Some((start, end)) = period {
        lines = json!([{"id": format!("il_{id}"), "object": "line_item",
            "period": {"start": start, "end": end},
            "pricing": {"price_details": {"price": price}}}]);
    }
    json!({
        "id": id, "object": "invoice", "amount_paid": 999, "currency": "usd",
        "customer": "cus_1", "billing_reason": reason, "status": "paid",
        "parent": {"type": "subscription_details", "subscription_details": {
            "subscription": "sub_1", "metadata": {"org_id": org, "plan_id": "sub-pro", "order_id": order}}},
        "payments": {"object": "list", "data": [{"payment": {"type": "payment_intent", "payment_intent": pi}}]},
        "lines": {"object": "list", "data": lines},
    })
}

fn ts(t: chrono::DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// A subscription's whole life on Stripe: checkout, first invoice (before
/// the subscription is known: retrieved from Stripe), renewal, plan
/// change, partial and full refund, cancellation; every event twice, and
/// late, out-of-order subscription events changing nothing.
#[tokio::test]
async fn a_stripe_subscription_lives_its_whole_life() -> R {
    for backend in backends() {
        let shop = Shop::open(backend).await;
        let org = "subscriber";
        shop.price_plan("sub-starter", Some("price_starter_m"), None)
            .await;

        // Validation first, then the checkout.
        let (status, body) = shop
            .post(org, "/payment/create-session", json!({"channel": "stripe", "type": "subscription",
                "plan_id": "sub-nope", "success_url": "https://app.test/ok", "cancel_url": "https://app.test/no"}))
            .await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (404, Some("PLAN_NOT_FOUND"))
        );
        let (status, body) = shop
            .post(
                org,
                "/payment/create-session",
                json!({"channel": "stripe", "type": "subscription",
                "plan_id": "sub-pro", "billing_period": "weekly",
                "success_url": "https://app.test/ok", "cancel_url": "https://app.test/no"}),
            )
            .await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("INVALID_ARGUMENT"))
        );
        let (status, body) = shop
            .post(
                org,
                "/payment/create-session",
                json!({"channel": "stripe", "type": "subscription",
                "plan_id": "sub-pro", "billing_period": "monthly",
                "success_url": "https://app.test/ok", "cancel_url": "https://app.test/no"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let order = body["data"]["order_id"].as_str().unwrap().to_owned();
        let call = shop.stripe.calls("/v1/checkout/sessions").pop().unwrap();
        assert_eq!(call.form["mode"], "subscription");
        assert_eq!(call.form["client_reference_id"], order);
        assert_eq!(call.form["subscription_data[metadata][org_id]"], org);
        assert_eq!(call.form["subscription_data[metadata][plan_id]"], "sub-pro");
        assert_eq!(
            call.form["line_items[0][price_data][recurring][interval]"],
            "month"
        );
        assert_eq!(call.form["line_items[0][price_data][unit_amount]"], "999");
        assert_eq!(shop.plan_of(org).await, ("SUB_BASE".into(), false));

        // The first invoice arrives before anything says what sub_1 is:
        // the subscription is retrieved from Stripe. Twice: granted once.
        let t0 = shop.clock.now();
        let p1 = (ts(t0), ts(t0 + TimeDelta::days(30)));
        shop.stripe
            .put_subscription(stripe_sub("sub_1", org, "active", "price_pro_m", p1));
        let first = shop.event(
            "invoice.paid",
            stripe_invoice(
                "in_1",
                org,
                Some(&order),
                "pi_sub_1",
                "price_pro_m",
                None,
                "subscription_create",
            ),
        );
        assert_eq!(shop.deliver(&first).await, 200);
        assert_eq!(shop.deliver(&first).await, 200);
        assert_eq!(shop.stripe.calls("/v1/subscriptions/sub_1").len(), 1);
        assert_eq!(shop.stored(org).await, 10_000.0);
        assert_eq!(shop.plan_of(org).await, ("SUB_PRO".into(), true));
        assert_eq!(shop.info(org).await, ("SUB_PRO".into(), 10_000));
        let (_, info) = shop.get(org, "/user/credits/info").await;
        let lot = &info["breakdown"][0];
        assert_eq!(lot["purchase_kind"], "Subscription");
        assert_eq!(lot["expiry_date"], p1.1, "the lot ends with the period");

        // The checkout's own events, and the subscription's creation
        // (older than what was retrieved): nothing more.
        let mut completed = session(&order, org, "paid", "");
        completed["mode"] = json!("subscription");
        completed["payment_intent"] = Value::Null;
        completed["subscription"] = json!("sub_1");
        assert_eq!(
            shop.send("checkout.session.completed", completed.clone())
                .await,
            200
        );
        assert_eq!(
            shop.send("checkout.session.completed", completed).await,
            200
        );
        let mut older = shop.event(
            "customer.subscription.created",
            stripe_sub("sub_1", org, "incomplete", "price_pro_m", p1),
        );
        let mut v: Value = serde_json::from_slice(&older)?;
        v["created"] = json!(ts(t0) - 60);
        older = serde_json::to_vec(&v)?;
        assert_eq!(shop.deliver(&older).await, 200);
        assert_eq!(
            shop.plan_of(org).await,
            ("SUB_PRO".into(), true),
            "an older state is ignored"
        );
        assert_eq!(shop.stored(org).await, 10_000.0);
        let (_, body) = shop.get(org, &format!("/orders/{order}")).await;
        assert_eq!(body["data"]["status"], "paid");
        let (_, list) = shop.get(org, "/orders").await;
        assert_eq!(
            list["pagination"]["total"], 1,
            "the first invoice is the checkout's order"
        );

        // Renewal: the invoice first (its line names the period), then the
        // subscription's update. The first period's credits expire.
        shop.clock.advance(TimeDelta::days(30));
        let t1 = shop.clock.now();
        let p2 = (ts(t1), ts(t1 + TimeDelta::days(30)));
        let renewal = shop.event(
            "invoice.paid",
            stripe_invoice(
                "in_2",
                org,
                Some(&order),
                "pi_sub_2",
                "price_pro_m",
                Some(p2),
                "subscription_cycle",
            ),
        );
        assert_eq!(shop.deliver(&renewal).await, 200);
        assert_eq!(shop.deliver(&renewal).await, 200);
        assert_eq!(
            shop.send(
                "customer.subscription.updated",
                stripe_sub("sub_1", org, "active", "price_pro_m", p2)
            )
            .await,
            200
        );
        assert_eq!(shop.info(org).await, ("SUB_PRO".into(), 10_000));
        let (_, list) = shop.get(org, "/orders").await;
        assert_eq!(list["pagination"]["total"], 2, "a renewal is an order");

        // Plan change (through the portal: the price changes): the plan
        // is Starter from now, and the next invoice grants Starter's.
        shop.clock.advance(TimeDelta::days(1));
        assert_eq!(
            shop.send(
                "customer.subscription.updated",
                stripe_sub("sub_1", org, "active", "price_starter_m", p2)
            )
            .await,
            200
        );
        assert_eq!(shop.plan_of(org).await, ("SUB_STARTER".into(), true));
        assert_eq!(
            shop.stored(org).await,
            10_000.0,
            "the change grants nothing by itself"
        );
        shop.clock.advance(TimeDelta::days(29));
        let t2 = shop.clock.now();
        let p3 = (ts(t2), ts(t2 + TimeDelta::days(30)));
        let mut third = stripe_invoice(
            "in_3",
            org,
            Some(&order),
            "pi_sub_3",
            "price_starter_m",
            Some(p3),
            "subscription_cycle",
        );
        third["amount_paid"] = json!(499);
        assert_eq!(shop.send("invoice.paid", third).await, 200);
        assert_eq!(shop.stored(org).await, 3_000.0);

        // Partial, then full refund of that invoice (cumulative amounts).
        let refund = |refunded: i64| {
            json!({"id": "ch_sub_3", "object": "charge",
            "payment_intent": "pi_sub_3", "amount": 499, "amount_refunded": refunded})
        };
        for refunded in [200, 200, 499] {
            assert_eq!(shop.send("charge.refunded", refund(refunded)).await, 200);
            let left = 3_000 * CREDIT - 3_000 * CREDIT * refunded / 499;
            assert_eq!(
                shop.stored(org).await,
                left as f64 / CREDIT as f64,
                "after {refunded}"
            );
        }

        // Cancellation: back to the free plan; a late update cannot revive it.
        let deleted = stripe_sub("sub_1", org, "canceled", "price_starter_m", p3);
        assert_eq!(
            shop.send("customer.subscription.deleted", deleted).await,
            200
        );
        assert_eq!(shop.plan_of(org).await, ("SUB_BASE".into(), false));
        assert_eq!(shop.info(org).await.0, "SUB_BASE");
        assert_eq!(
            shop.send(
                "customer.subscription.updated",
                stripe_sub("sub_1", org, "active", "price_starter_m", p3)
            )
            .await,
            200
        );
        assert_eq!(shop.plan_of(org).await, ("SUB_BASE".into(), false));

        let rows = invariants::rows_by_org(&shop.t.server.state.db).await;
        let grants = rows[org].iter().filter(|r| r.kind == "grant").count();
        assert_eq!(grants, 3, "one grant per paid invoice");
        invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
        shop.close().await;
    }
    Ok(())
}

fn iso(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn creem_sub(
    org: &str,
    order: &str,
    status: &str,
    period: (chrono::DateTime<Utc>, chrono::DateTime<Utc>),
    transaction: &str,
) -> Value {
    json!({
        "id": "sub_creem_1", "object": "subscription", "status": status,
        "product": {"id": "prod_pro", "object": "product"},
        "customer": {"id": "cust_creem_1", "object": "customer"},
        "current_period_start_date": iso(period.0), "current_period_end_date": iso(period.1),
        "last_transaction_id": transaction,
        "last_transaction": {"id": transaction, "amount": 999, "currency": "USD"},
        "metadata": {"order_id": order, "org_id": org, "plan_id": "sub-pro"},
    })
}

/// The same life on Creem: checkout (Creem's own product needed), the
/// first payment as its two events in either order and twice, renewal,
/// refunds by their own amounts (each refund once), cancellation, the
/// portal, and a pack paid through Creem.
#[tokio::test]
async fn a_creem_subscription_lives_its_whole_life() -> R {
    for backend in backends() {
        let shop = Shop::open(backend).await;
        let org = "creem-subscriber";
        let checkout = |plan: &str| {
            json!({"channel": "creem", "type": "subscription", "plan_id": plan,
            "success_url": "https://app.test/ok", "cancel_url": "https://app.test/no"})
        };

        let (status, body) = shop
            .post(org, "/payment/create-session", checkout("sub-pro"))
            .await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("CREEM_PRODUCT_NOT_CONFIGURED"))
        );
        shop.price_plan("sub-pro", None, Some("prod_pro")).await;
        shop.creem.set_failing(true);
        let (status, _) = shop
            .post(org, "/payment/create-session", checkout("sub-pro"))
            .await;
        assert_eq!(status, 503);
        shop.creem.set_failing(false);
        let (status, body) = shop
            .post(org, "/payment/create-session", checkout("sub-pro"))
            .await;
        assert_eq!(status, 200, "{body}");
        let order = body["data"]["order_id"].as_str().unwrap().to_owned();
        assert!(
            body["data"]["url"]
                .as_str()
                .unwrap()
                .starts_with("https://checkout.creem.test/")
        );
        let call = shop.creem.calls("/v1/checkouts").pop().unwrap();
        assert_eq!(call["request_id"], order.as_str());
        assert_eq!(call["product_id"], "prod_pro");
        assert_eq!(call["metadata"]["org_id"], org);
        assert_eq!(call["metadata"]["order_id"], order.as_str());
        let (_, list) = shop.get(org, "/orders").await;
        assert_eq!(
            list["pagination"]["total"], 1,
            "the failed attempt's order was reopened"
        );

        // A bad signature changes nothing.
        let r = shop
            .t
            .http
            .post(shop.t.rest("/payment/webhook/creem"))
            .header("creem-signature", "00ff")
            .body("{}")
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 400);

        // The first payment: subscription.paid and checkout.completed,
        // each twice, grant one period.
        let t0 = shop.clock.now();
        let p1 = (t0, t0 + TimeDelta::days(30));
        let completed = json!({
            "id": "ch_creem_1", "object": "checkout", "status": "completed", "request_id": order,
            "order": {"id": "o_creem_1", "amount": 999, "currency": "USD", "transaction": "tran_1"},
            "product": {"id": "prod_pro"}, "customer": {"id": "cust_creem_1"},
            "subscription": creem_sub(org, &order, "active", p1, "tran_1"),
            "metadata": {"order_id": order, "org_id": org},
        });
        for _ in 0..2 {
            assert_eq!(
                shop.send_creem(
                    "subscription.paid",
                    creem_sub(org, &order, "active", p1, "tran_1")
                )
                .await,
                200
            );
            assert_eq!(
                shop.send_creem("checkout.completed", completed.clone())
                    .await,
                200
            );
        }
        assert_eq!(shop.stored(org).await, 10_000.0);
        assert_eq!(shop.plan_of(org).await, ("SUB_PRO".into(), true));
        assert_eq!(shop.info(org).await, ("SUB_PRO".into(), 10_000));
        let (_, body) = shop.get(org, &format!("/orders/{order}")).await;
        assert_eq!(body["data"]["status"], "paid");

        // Creem's portal for a Creem customer.
        let (status, body) = shop
            .post(
                org,
                "/subscription/portal",
                json!({"return_url": "https://app.test/a"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["data"]["url"],
            "https://creem.test/portal/cust_creem_1"
        );

        // Renewal.
        shop.clock.advance(TimeDelta::days(30));
        let t1 = shop.clock.now();
        let p2 = (t1, t1 + TimeDelta::days(30));
        assert_eq!(
            shop.send_creem(
                "subscription.paid",
                creem_sub(org, &order, "active", p2, "tran_2")
            )
            .await,
            200
        );
        assert_eq!(shop.info(org).await, ("SUB_PRO".into(), 10_000));
        let (_, list) = shop.get(org, "/orders").await;
        assert_eq!(list["pagination"]["total"], 2);

        // Refunds carry their own amounts: each refund id counts once.
        let refund = |id: &str, cents: i64| {
            json!({"id": id, "object": "refund", "status": "succeeded",
            "refund_amount": cents, "refund_currency": "USD",
            "transaction": {"id": "tran_2", "amount": 999}, "subscription": {"id": "sub_creem_1"}})
        };
        let first = 10_000 * CREDIT * 400 / 999;
        for _ in 0..2 {
            assert_eq!(
                shop.send_creem("refund.created", refund("ref_1", 400))
                    .await,
                200
            );
            assert_eq!(
                shop.stored(org).await,
                (10_000 * CREDIT - first) as f64 / CREDIT as f64
            );
        }
        assert_eq!(
            shop.send_creem("refund.created", refund("ref_2", 599))
                .await,
            200
        );
        assert_eq!(shop.stored(org).await, 0.0);

        // Cancellation.
        assert_eq!(
            shop.send_creem(
                "subscription.canceled",
                creem_sub(org, &order, "canceled", p2, "tran_2")
            )
            .await,
            200
        );
        assert_eq!(shop.plan_of(org).await, ("SUB_BASE".into(), false));

        // A pack through Creem, paid by checkout.completed, refunded in full.
        let buyer = "creem-pack-buyer";
        shop.subscribe(buyer, "sub-starter").await;
        let (status, body) = shop
            .buy(buyer, json!({"packId": "pack-1", "channel": "creem"}))
            .await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("CREEM_PRODUCT_NOT_CONFIGURED"))
        );
        pack::Entity::update(pack::ActiveModel {
            id: Set("pack-1".into()),
            creem_product_id: Set(Some("prod_pack_1".into())),
            ..Default::default()
        })
        .exec(&shop.t.server.state.db)
        .await?;
        let (status, body) = shop
            .buy(buyer, json!({"packId": "pack-1", "channel": "creem"}))
            .await;
        assert_eq!(status, 200, "{body}");
        let pack_order = body["data"]["order_id"].as_str().unwrap().to_owned();
        let paid = json!({"id": "ch_creem_pack", "object": "checkout", "status": "completed",
            "request_id": pack_order, "product": {"id": "prod_pack_1"},
            "order": {"id": "o_creem_pack", "amount": 1999, "currency": "USD", "transaction": "tran_pack"},
            "customer": {"id": "cust_creem_2"}, "metadata": {"order_id": pack_order, "org_id": buyer}});
        assert_eq!(
            shop.send_creem("checkout.completed", paid.clone()).await,
            200
        );
        assert_eq!(shop.send_creem("checkout.completed", paid).await, 200);
        assert_eq!(shop.stored(buyer).await, 100.0);
        let whole =
            json!({"id": "ref_3", "refund_amount": 1999, "transaction": {"id": "tran_pack"}});
        assert_eq!(shop.send_creem("refund.created", whole).await, 200);
        assert_eq!(shop.stored(buyer).await, 0.0);
        let (_, body) = shop.get(buyer, &format!("/orders/{pack_order}")).await;
        assert_eq!(body["data"]["status"], "refunded");

        invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
        shop.close().await;
    }
    Ok(())
}

/// Where a delivery goes: which provider's webhook, on which replica.
#[derive(Clone, Copy)]
enum Hook {
    Stripe(usize),
    Creem(usize),
}

impl Shop {
    /// Delivers every body at once; those answered 503 (the event refers
    /// to something another delivery is still recording) come again, as
    /// providers retry, until each has been answered 200.
    async fn deliver_all(&self, mut pending: Vec<(Hook, &[u8])>) {
        for _round in 0..10 {
            let statuses = futures::future::join_all(pending.iter().map(|(hook, body)| async {
                match *hook {
                    Hook::Stripe(i) => self.deliver_on(i, body).await,
                    Hook::Creem(i) => self.deliver_creem_on(i, body).await,
                }
            }))
            .await;
            assert!(
                statuses.iter().all(|s| *s == 200 || *s == 503),
                "{statuses:?}"
            );
            pending = pending
                .into_iter()
                .zip(statuses)
                .filter(|(_, s)| *s != 200)
                .map(|(d, _)| d)
                .collect();
            if pending.is_empty() {
                return;
            }
        }
        panic!("{} deliveries still refused after 10 rounds", pending.len());
    }
}

/// Every subscription event four times, shuffled, all at once, to two
/// replicas on one PostgreSQL: each invoice grants once, the checkout's
/// order is paid once, and Creem's first payment (two events) grants once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_events_race_across_replicas() -> R {
    if !backends().contains(&Backend::Postgres) {
        return Ok(());
    }
    use rand::{SeedableRng, seq::SliceRandom};
    let shop = Shop::open_with(Backend::Postgres, 2, &[]).await;
    let checkout = |channel: &str| {
        json!({"channel": channel, "type": "subscription", "plan_id": "sub-pro",
        "success_url": "https://app.test/ok", "cancel_url": "https://app.test/no"})
    };

    // Stripe: the first invoice (its subscription unknown, retrieved), the
    // checkout, the subscription's creation and update, and a renewal.
    let org = "stripe-racer";
    let (status, body) = shop
        .post(org, "/payment/create-session", checkout("stripe"))
        .await;
    assert_eq!(status, 200, "{body}");
    let order = body["data"]["order_id"].as_str().unwrap().to_owned();
    let t0 = shop.clock.now();
    let p1 = (ts(t0), ts(t0 + TimeDelta::days(30)));
    let p2 = (p1.1, p1.1 + 30 * 86_400);
    shop.stripe
        .put_subscription(stripe_sub("sub_1", org, "active", "price_pro_m", p1));
    let mut completed = session(&order, org, "paid", "");
    completed["mode"] = json!("subscription");
    completed["payment_intent"] = Value::Null;
    completed["subscription"] = json!("sub_1");
    let stripe_events = [
        shop.event(
            "invoice.paid",
            stripe_invoice(
                "in_1",
                org,
                Some(&order),
                "pi_1",
                "price_pro_m",
                None,
                "subscription_create",
            ),
        ),
        shop.event("checkout.session.completed", completed),
        shop.event(
            "customer.subscription.created",
            stripe_sub("sub_1", org, "active", "price_pro_m", p1),
        ),
        shop.event(
            "invoice.paid",
            stripe_invoice(
                "in_2",
                org,
                Some(&order),
                "pi_2",
                "price_pro_m",
                Some(p2),
                "subscription_cycle",
            ),
        ),
    ];

    // Creem: its first payment as subscription.paid and checkout.completed.
    shop.price_plan("sub-pro", None, Some("prod_pro")).await;
    let buyer = "creem-racer";
    let (status, body) = shop
        .post(buyer, "/payment/create-session", checkout("creem"))
        .await;
    assert_eq!(status, 200, "{body}");
    let creem_order = body["data"]["order_id"].as_str().unwrap().to_owned();
    let period = (t0, t0 + TimeDelta::days(30));
    let creem_events = [
        shop.creem_event(
            "subscription.paid",
            creem_sub(buyer, &creem_order, "active", period, "tran_1"),
        ),
        shop.creem_event(
            "checkout.completed",
            json!({
                "id": "ch_creem_1", "object": "checkout", "status": "completed",
                "request_id": creem_order,
                "order": {"id": "o_creem_1", "amount": 999, "currency": "USD", "transaction": "tran_1"},
                "product": {"id": "prod_pro"}, "customer": {"id": "cust_creem_1"},
                "subscription": creem_sub(buyer, &creem_order, "active", period, "tran_1"),
                "metadata": {"order_id": creem_order, "org_id": buyer},
            }),
        ),
    ];

    let mut deliveries: Vec<(Hook, &[u8])> = Vec::new();
    for copy in 0..4 {
        for (k, e) in stripe_events.iter().enumerate() {
            deliveries.push((Hook::Stripe(k + copy), e));
        }
        for (k, e) in creem_events.iter().enumerate() {
            deliveries.push((Hook::Creem(k + copy), e));
        }
    }
    deliveries.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
    shop.deliver_all(deliveries).await;

    assert_eq!(shop.stored(org).await, 20_000.0, "two invoices, two grants");
    assert_eq!(shop.plan_of(org).await, ("SUB_PRO".into(), true));
    let (_, body) = shop.get(org, &format!("/orders/{order}")).await;
    assert_eq!(body["data"]["status"], "paid");
    let (_, list) = shop.get(org, "/orders").await;
    assert_eq!(list["pagination"]["total"], 2, "one order per invoice");
    assert_eq!(shop.stored(buyer).await, 10_000.0, "one first payment");
    assert_eq!(shop.plan_of(buyer).await, ("SUB_PRO".into(), true));
    let (_, body) = shop.get(buyer, &format!("/orders/{creem_order}")).await;
    assert_eq!(body["data"]["status"], "paid");

    let rows = invariants::rows_by_org(&shop.t.server.state.db).await;
    let grants = |o: &str| rows[o].iter().filter(|r| r.kind == "grant").count();
    assert_eq!((grants(org), grants(buyer)), (2, 1));
    invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
    shop.close().await;
    Ok(())
}

fn error_code(body: &Value) -> &str {
    body["error_code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn coupons_lower_the_price_or_add_credits_and_redeem_once_when_paid() -> R {
    for backend in backends() {
        let shop = Shop::open_with(backend, 1, &[("PURCHASE_COOLDOWN_SECONDS", "0")]).await;
        let org = "couponer";
        shop.subscribe(org, "sub-starter").await;
        let soon = (shop.clock.now() + TimeDelta::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        shop.coupon(json!({"code": "tenoff", "kind": "percent_off", "value": 10}))
            .await;
        shop.coupon(json!({"code": "FIVE", "kind": "amount_off", "value": 500}))
            .await;
        shop.coupon(json!({"code": "ALL", "kind": "amount_off", "value": 5000}))
            .await;
        shop.coupon(
            json!({"code": "bonus50", "kind": "bonus_credits", "value": 50, "max_redemptions": 1}),
        )
        .await;
        shop.coupon(json!({"code": "OFF", "kind": "percent_off", "value": 10, "active": false}))
            .await;
        shop.coupon(
            json!({"code": "BRIEF", "kind": "percent_off", "value": 10, "expires_at": soon}),
        )
        .await;

        // Refused codes write nothing: no order, no provider call.
        let buy = |code: &str| json!({"packId": "pack-1", "coupon_code": code});
        for (code, why) in [
            ("NOSUCH", "unknown"),
            ("off", "not active"),
            ("ALL", "nothing to pay"),
        ] {
            let (status, body) = shop.buy(org, buy(code)).await;
            assert_eq!(
                (status, error_code(&body)),
                (400, "INVALID_COUPON"),
                "{body}"
            );
            assert!(body["message"].as_str().unwrap().contains(why), "{body}");
        }
        let mut packs =
            billing::pb::packs_service_client::PacksServiceClient::new(shop.t.channel().await);
        let refused = packs
            .buy_pack(common::authed(
                &shop.token(org),
                billing::pb::BuyPackRequest {
                    pack_id: "pack-1".into(),
                    coupon_code: Some("nosuch".into()),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(common::reason(&refused), "INVALID_COUPON", "{refused:?}");
        let (status, body) = shop.buy(org, buy(&"X".repeat(65))).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "INVALID_ARGUMENT"),
            "{body}"
        );
        assert!(shop.stripe.calls("/v1/checkout/sessions").is_empty());
        let (_, orders) = shop.get(org, "/orders").await;
        assert_eq!(orders["data"], json!([]), "nothing written");

        // Percent off, typed in any case: Stripe charges the discounted
        // price, the order records it; redeemed once the payment is in,
        // whatever the replays.
        let (status, body) = shop.buy(org, buy("TenOff")).await;
        assert_eq!(status, 200, "{body}");
        let order = body["data"]["order_id"].as_str().unwrap().to_owned();
        let form = shop.stripe.calls("/v1/checkout/sessions")[0].form.clone();
        assert_eq!(form["line_items[0][price_data][unit_amount]"], "1800");
        let (_, o) = shop.get(org, &format!("/orders/{order}")).await;
        assert_eq!(o["data"]["amount"], 18.0, "{o}");
        assert_eq!(shop.redeemed("TENOFF").await, 0, "not before the payment");
        let paid = shop.event(
            "checkout.session.completed",
            session(&order, org, "paid", "pi_c1"),
        );
        for _ in 0..3 {
            assert_eq!(shop.deliver(&paid).await, 200);
        }
        let again = shop.event(
            "checkout.session.completed",
            session(&order, org, "paid", "pi_c1"),
        );
        assert_eq!(shop.deliver(&again).await, 200);
        assert_eq!(shop.redeemed("TENOFF").await, 1);
        assert_eq!(shop.stored(org).await, 100.0);

        // Amount off.
        let pack3 = |code: &str| json!({"packId": "pack-3", "coupon_code": code});
        let (status, _) = shop.buy(org, pack3("five")).await;
        assert_eq!(status, 200);
        let form = shop.stripe.calls("/v1/checkout/sessions")[1].form.clone();
        assert_eq!(form["line_items[0][price_data][unit_amount]"], "9499");

        // Bonus credits: the price as it is, the credits with the payment,
        // and a single use held by the open order.
        let (status, body) = shop.buy(org, buy("BONUS50")).await;
        assert_eq!(status, 200, "{body}");
        let bonus_order = body["data"]["order_id"].as_str().unwrap().to_owned();
        let form = shop.stripe.calls("/v1/checkout/sessions")[2].form.clone();
        assert_eq!(form["line_items[0][price_data][unit_amount]"], "1999");
        let (status, body) = shop.buy(org, pack3("BONUS50")).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "INVALID_COUPON"),
            "{body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("used up"),
            "{body}"
        );
        let paid = shop.event(
            "checkout.session.completed",
            session(&bonus_order, org, "paid", "pi_c3"),
        );
        assert_eq!(shop.deliver(&paid).await, 200);
        assert_eq!(shop.deliver(&paid).await, 200);
        assert_eq!(shop.stored(org).await, 250.0, "100 + 100 + a 50 bonus");
        assert_eq!(shop.redeemed("BONUS50").await, 1);
        let rows = invariants::rows_by_org(&shop.t.server.state.db).await;
        let bonus: Vec<_> = rows[org].iter().filter(|r| r.kind == "coupon").collect();
        assert_eq!(bonus.len(), 1);
        assert_eq!(bonus[0].amount_micros, 50 * CREDIT);

        // Expired.
        shop.clock.advance(TimeDelta::hours(2));
        let (status, body) = shop.buy(org, pack3("BRIEF")).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "INVALID_COUPON"),
            "{body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("expired"),
            "{body}"
        );

        // An open order holds its coupon for a day; a payment that comes
        // after the last use went elsewhere redeems nothing and adds no
        // bonus (the pack's credits still arrive).
        shop.coupon(
            json!({"code": "ONCE", "kind": "bonus_credits", "value": 5, "max_redemptions": 1}),
        )
        .await;
        let (status, body) = shop.buy(org, pack3("ONCE")).await;
        assert_eq!(status, 200, "{body}");
        let late_order = body["data"]["order_id"].as_str().unwrap().to_owned();
        shop.clock.advance(TimeDelta::hours(25));
        shop.subscribe("couponer-2", "sub-starter").await;
        let (status, body) = shop.buy("couponer-2", buy("ONCE")).await;
        assert_eq!(status, 200, "{body}");
        let other = body["data"]["order_id"].as_str().unwrap().to_owned();
        let paid = shop.event(
            "checkout.session.completed",
            session(&other, "couponer-2", "paid", "pi_c5"),
        );
        assert_eq!(shop.deliver(&paid).await, 200);
        let paid = shop.event(
            "checkout.session.completed",
            session(&late_order, org, "paid", "pi_c6"),
        );
        assert_eq!(shop.deliver(&paid).await, 200);
        assert_eq!(shop.redeemed("ONCE").await, 1);
        assert_eq!(shop.stored("couponer-2").await, 105.0);
        assert_eq!(shop.stored(org).await, 1350.0, "250 + pack-3, no bonus");

        // Creem: the discount goes as Creem's discount code.
        pack::Entity::update(pack::ActiveModel {
            id: Set("pack-2".into()),
            creem_product_id: Set(Some("prod_pack_2".into())),
            ..Default::default()
        })
        .exec(&shop.t.server.state.db)
        .await?;
        let (status, body) = shop
            .buy(
                org,
                json!({"packId": "pack-2", "channel": "creem", "coupon_code": "tenoff"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let call = shop.creem.calls("/v1/checkouts").pop().unwrap();
        assert_eq!(call["discount_code"], "TENOFF", "{call}");

        // Subscriptions: bonus coupons on both providers, discounts on
        // Stripe refused (nothing written).
        let sub = |channel: &str, code: &str| {
            json!({"channel": channel, "type": "subscription", "plan_id": "sub-pro",
                "success_url": "https://app.test/ok", "cancel_url": "https://app.test/no",
                "coupon_code": code})
        };
        let sessions = shop.stripe.calls("/v1/checkout/sessions").len();
        let (status, body) = shop
            .post(
                "subscriber",
                "/payment/create-session",
                sub("stripe", "TENOFF"),
            )
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "INVALID_COUPON"),
            "{body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("packs only"),
            "{body}"
        );
        assert_eq!(shop.stripe.calls("/v1/checkout/sessions").len(), sessions);
        let (_, orders) = shop.get("subscriber", "/orders").await;
        assert_eq!(orders["data"], json!([]), "nothing written");
        shop.coupon(json!({"code": "WELCOME", "kind": "bonus_credits", "value": 7}))
            .await;
        let (status, body) = shop
            .post(
                "subscriber",
                "/payment/create-session",
                sub("stripe", "welcome"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let sub_order = body["data"]["order_id"].as_str().unwrap().to_owned();
        let mut completed = session(&sub_order, "subscriber", "paid", "");
        completed["mode"] = json!("subscription");
        completed["payment_intent"] = Value::Null;
        completed["subscription"] = json!("sub_c1");
        let t0 = shop.clock.now();
        shop.stripe.put_subscription(stripe_sub(
            "sub_c1",
            "subscriber",
            "active",
            "price_pro_m",
            (ts(t0), ts(t0 + TimeDelta::days(30))),
        ));
        let completed = shop.event("checkout.session.completed", completed);
        assert_eq!(shop.deliver(&completed).await, 200);
        assert_eq!(shop.deliver(&completed).await, 200);
        assert_eq!(shop.redeemed("WELCOME").await, 1);
        let rows = invariants::rows_by_org(&shop.t.server.state.db).await;
        let bonus: i64 = rows["subscriber"]
            .iter()
            .filter(|r| r.kind == "coupon")
            .map(|r| r.amount_micros)
            .sum();
        assert_eq!(bonus, 7 * CREDIT);

        invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
        shop.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coupon_limited_to_three_uses_is_redeemed_three_times_by_ten_racing_buyers() -> R {
    use rand::{SeedableRng, seq::SliceRandom};
    for backend in backends() {
        let replicas = if backend == Backend::Postgres { 2 } else { 1 };
        let shop = Shop::open_with(backend, replicas, &[]).await;
        shop.coupon(
            json!({"code": "RACE3", "kind": "percent_off", "value": 20, "max_redemptions": 3}),
        )
        .await;
        let orgs: Vec<String> = (0..10).map(|i| format!("racer-{i}")).collect();
        for org in &orgs {
            shop.subscribe(org, "sub-starter").await;
        }
        let attempts = orgs.iter().enumerate().map(|(i, org)| {
            shop.buy_on(i, org, json!({"packId": "pack-1", "coupon_code": "race3"}))
        });
        let answers = futures::future::join_all(attempts).await;
        let won: Vec<(String, String)> = orgs
            .iter()
            .zip(&answers)
            .filter(|(_, (s, _))| *s == 200)
            .map(|(org, (_, b))| {
                (
                    org.clone(),
                    b["data"]["order_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(won.len(), 3, "{answers:?}");
        assert!(
            answers
                .iter()
                .all(|(s, b)| *s == 200 || (*s == 400 && error_code(b) == "INVALID_COUPON")),
            "{answers:?}"
        );
        // Every winner pays; each payment event three times, shuffled,
        // to every replica at once.
        let events: Vec<Vec<u8>> = won
            .iter()
            .enumerate()
            .map(|(n, (org, order))| {
                shop.event(
                    "checkout.session.completed",
                    session(order, org, "paid", &format!("pi_race3_{n}")),
                )
            })
            .collect();
        let mut pending: Vec<(usize, &[u8])> = events
            .iter()
            .flat_map(|e| (0..3).map(move |k| (k, e.as_slice())))
            .collect();
        pending.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
        for _round in 0..10 {
            let statuses =
                futures::future::join_all(pending.iter().map(|(i, e)| shop.deliver_on(*i, e)))
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
        assert_eq!(shop.redeemed("RACE3").await, 3);
        let redemptions = billing::entities::coupon_redemption::Entity::find()
            .all(&shop.t.server.state.db)
            .await?;
        assert_eq!(redemptions.len(), 3);
        for (org, _) in &won {
            assert_eq!(shop.stored(org).await, 100.0);
        }
        // Used up: a further checkout is refused.
        shop.subscribe("racer-late", "sub-starter").await;
        let (status, body) = shop
            .buy(
                "racer-late",
                json!({"packId": "pack-1", "coupon_code": "RACE3"}),
            )
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "INVALID_COUPON"),
            "{body}"
        );
        invariants::check(&shop.t.server.state.db, shop.clock.now()).await;
        shop.close().await;
    }
    Ok(())
}
