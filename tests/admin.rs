//! Daily check-in, its configuration, and the admin API (plans, coupons,
//! packs, rates, audit) over REST and gRPC, on SQLite and PostgreSQL.

#![allow(
    clippy::unwrap_used,
    reason = "a failed step of a test should panic there"
)]

mod common;

use std::sync::Arc;

use billing::{
    auth::Role,
    clock::{Clock, ManualClock},
    pb,
};
use chrono::{DateTime, TimeDelta, Utc};
use common::{Backend, TestServer, authed, backends, invariants, json_of, reason};
use serde_json::{Value, json};

type R = Result<(), Box<dyn std::error::Error>>;

/// A server whose clock the test moves, and REST calls as a user or admin.
struct Desk {
    t: TestServer,
    replicas: Vec<billing::RunningServer>,
    clock: ManualClock,
}

/// A minute before a UTC midnight later than now (so tokens issued now
/// are already valid at the clock's time).
fn before_midnight() -> DateTime<Utc> {
    let tomorrow = Utc::now().date_naive() + TimeDelta::days(1);
    tomorrow.and_hms_opt(23, 59, 0).unwrap().and_utc()
}

impl Desk {
    async fn open(backend: Backend, replicas: usize) -> Self {
        Self::open_with(backend, replicas, &[]).await
    }

    /// `replicas` servers on one database, with settings `env`.
    async fn open_with(backend: Backend, replicas: usize, env: &[(&str, &str)]) -> Self {
        let clock = ManualClock::new(before_midnight());
        let t = TestServer::start_with(backend, env, Arc::new(clock.clone())).await;
        let mut others = Vec::new();
        for _ in 1..replicas {
            others.push(common::start_on(&t.db.url, env, Arc::new(clock.clone())).await);
        }
        Self {
            t,
            replicas: others,
            clock,
        }
    }

    fn url(&self, i: usize, path: &str) -> String {
        match i % (self.replicas.len() + 1) {
            0 => self.t.rest(path),
            n => format!("http://{}{path}", self.replicas[n - 1].http_addr),
        }
    }

    fn user(&self, org: &str, user: &str) -> String {
        let now = self.clock.now().timestamp();
        self.t.keys.issue(user, org, Role::User, now, 3600)
    }

    fn admin(&self) -> String {
        let now = self.clock.now().timestamp();
        self.t.keys.issue("ops-1", "ops", Role::Admin, now, 3600)
    }

    async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .t
            .http
            .request(method, self.url(i, path))
            .bearer_auth(token);
        if let Some(body) = body {
            r = r.json(&body);
        }
        json_of(r.send().await.unwrap()).await.unwrap()
    }

    async fn check_in_on(&self, i: usize, org: &str, user: &str) -> (u16, Value) {
        let token = self.user(org, user);
        self.call(i, reqwest::Method::POST, "/checkin", &token, None)
            .await
    }

    async fn check_in(&self, org: &str, user: &str) -> (u16, Value) {
        self.check_in_on(0, org, user).await
    }

    async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.call(0, reqwest::Method::GET, path, &self.admin(), None)
            .await
    }

    async fn admin_send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        self.call(0, method, path, &self.admin(), Some(body)).await
    }

    async fn audit_count(&self) -> i64 {
        let (_, body) = self.admin_get("/admin/audit").await;
        body["pagination"]["total"].as_i64().unwrap()
    }

    async fn close(self) {
        for r in self.replicas {
            r.shutdown().await.unwrap();
        }
        self.t.stop().await;
    }
}

fn code(body: &Value) -> &str {
    body["error_code"].as_str().unwrap_or_default()
}

/// One award per user per UTC day, streaks across midnights, the bonus
/// from the configuration, disabled check-in, and the status read.
#[tokio::test]
async fn checkin_awards_once_a_day_and_counts_streaks_across_midnight() -> R {
    for backend in backends() {
        let desk = Desk::open(backend, 1).await;
        let org = "morning-org";
        let midnight = desk.clock.now() + TimeDelta::minutes(1);

        let (status, body) = desk.check_in(org, "ann").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["credits_awarded"], 5);
        assert_eq!(body["data"]["streak"], 1);
        assert_eq!(body["data"]["balance"], 5);
        assert_eq!(
            body["data"]["next_checkin_at"].as_str().unwrap(),
            midnight.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        let (status, body) = desk.check_in(org, "ann").await;
        assert_eq!((status, code(&body)), (409, "ALREADY_CHECKED_IN"));
        // Another user of the same organization has a day of their own.
        let (status, body) = desk.check_in(org, "bob").await;
        assert_eq!((status, body["data"]["balance"].clone()), (200, json!(10)));

        // Over gRPC: the status, and the same refusal.
        let mut checkin =
            pb::checkin_service_client::CheckinServiceClient::new(desk.t.channel().await);
        let token = desk.user(org, "ann");
        let s = checkin
            .get_checkin_status(authed(&token, pb::GetCheckinStatusRequest {}))
            .await?
            .into_inner();
        assert_eq!((s.enabled, s.checked_in_today, s.streak), (true, true, 1));
        let err = checkin
            .checkin(authed(&token, pb::CheckinRequest {}))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (tonic::Code::AlreadyExists, "ALREADY_CHECKED_IN")
        );

        // A streak bonus, then midnight: day 2 of the streak.
        let (status, body) = desk
            .admin_send(
                reqwest::Method::PUT,
                "/admin/checkin/config",
                json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 30, "streak_bonus": 2.5}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["streak_bonus"], 2.5);
        desk.clock.set(midnight);
        let (status, body) = desk.check_in(org, "ann").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["streak"], 2);
        assert_eq!(body["data"]["credits_awarded"], 7.5);
        assert_eq!(body["data"]["balance"], 17.5);

        // A missed day starts the streak over.
        desk.clock.advance(TimeDelta::days(2));
        let (_, body) = desk.check_in(org, "ann").await;
        assert_eq!(
            (
                body["data"]["streak"].clone(),
                body["data"]["credits_awarded"].clone()
            ),
            (json!(1), json!(5))
        );

        // The ledger: checkin rows, lots expiring after lot_expiry_days.
        let token = desk.user(org, "ann");
        let (_, tx) = desk
            .call(
                0,
                reqwest::Method::GET,
                "/credits/transactions?type=checkin",
                &token,
                None,
            )
            .await;
        assert_eq!(tx["pagination"]["total"], 4);
        let (_, info) = desk
            .call(0, reqwest::Method::GET, "/user/credits/info", &token, None)
            .await;
        let newest = info["breakdown"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["expiry_date"].as_i64().unwrap())
            .max()
            .unwrap();
        assert_eq!(newest, (desk.clock.now() + TimeDelta::days(30)).timestamp());

        // Off: CHECKIN_DISABLED, for the next check-in already.
        desk.clock.advance(TimeDelta::days(1));
        let (status, _) = desk
            .admin_send(
                reqwest::Method::PUT,
                "/admin/checkin/config",
                json!({"enabled": false, "credits_per_day": 5, "lot_expiry_days": 30}),
            )
            .await;
        assert_eq!(status, 200);
        let (status, body) = desk.check_in(org, "ann").await;
        assert_eq!((status, code(&body)), (400, "CHECKIN_DISABLED"));

        invariants::check(&desk.t.server.state.db, desk.clock.now()).await;
        desk.close().await;
    }
    Ok(())
}

/// Bad configurations are 400 naming the field and change nothing; good
/// ones are audited with the record before and after.
#[tokio::test]
async fn checkin_config_is_validated_and_audited() -> R {
    for backend in backends() {
        let desk = Desk::open(backend, 1).await;
        let (status, before) = desk.admin_get("/admin/checkin/config").await;
        assert_eq!(status, 200);
        assert_eq!(
            before["data"],
            json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 30, "streak_bonus": 0})
        );
        let audits = desk.audit_count().await;
        let bad = [
            (
                json!({"enabled": true, "credits_per_day": -1, "lot_expiry_days": 30}),
                "credits_per_day",
            ),
            (
                json!({"enabled": true, "credits_per_day": "5", "lot_expiry_days": 30}),
                "credits_per_day",
            ),
            (
                json!({"enabled": true, "credits_per_day": 1e13, "lot_expiry_days": 30}),
                "credits_per_day",
            ),
            (
                json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 0}),
                "lot_expiry_days",
            ),
            (
                json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 3651}),
                "lot_expiry_days",
            ),
            (
                json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 1.5}),
                "lot_expiry_days",
            ),
            (
                json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 30, "streak_bonus": -2}),
                "streak_bonus",
            ),
            (
                json!({"enabled": "yes", "credits_per_day": 5, "lot_expiry_days": 30}),
                "enabled",
            ),
            (
                json!({"credits_per_day": 5, "lot_expiry_days": 30}),
                "enabled",
            ),
            (json!({}), "enabled"),
        ];
        for (body, field) in bad {
            let (status, answer) = desk
                .admin_send(reqwest::Method::PUT, "/admin/checkin/config", body.clone())
                .await;
            assert_eq!((status, code(&answer)), (400, "INVALID_ARGUMENT"), "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{body} → {answer}"
            );
        }
        let (_, now) = desk.admin_get("/admin/checkin/config").await;
        assert_eq!(now["data"], before["data"], "nothing written");
        assert_eq!(desk.audit_count().await, audits);

        // A user may not change it; gRPC refuses the same bounds.
        let token = desk.user("someone", "u");
        let (status, _) = desk
            .call(
                0,
                reqwest::Method::PUT,
                "/admin/checkin/config",
                &token,
                Some(json!({"enabled": true, "credits_per_day": 5, "lot_expiry_days": 30})),
            )
            .await;
        assert_eq!(status, 403);
        let mut admin = pb::admin_service_client::AdminServiceClient::new(desk.t.channel().await);
        let err = admin
            .update_checkin_config(authed(
                &desk.admin(),
                pb::CheckinConfig {
                    enabled: true,
                    credits_per_day_micros: 1,
                    lot_expiry_days: 0,
                    streak_bonus_micros: 0,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("lot_expiry_days"), "{err:?}");

        // A good one, audited.
        let (status, _) = desk
            .admin_send(
                reqwest::Method::PUT,
                "/admin/checkin/config",
                json!({"enabled": true, "credits_per_day": 12.5, "lot_expiry_days": 7, "streak_bonus": 1}),
            )
            .await;
        assert_eq!(status, 200);
        let (_, log) = desk
            .admin_get("/admin/audit?action=checkin_config.update")
            .await;
        assert_eq!(log["pagination"]["total"], 1);
        let entry = &log["data"][0];
        assert_eq!(entry["actor"], "ops-1");
        assert_eq!(entry["before"]["credits_per_day_micros"], 5_000_000);
        assert_eq!(entry["after"]["credits_per_day_micros"], 12_500_000);
        assert_eq!(entry["after"]["lot_expiry_days"], 7);
        let got = admin
            .get_checkin_config(authed(&desk.admin(), pb::GetCheckinConfigRequest {}))
            .await?
            .into_inner();
        assert_eq!(
            (got.credits_per_day_micros, got.lot_expiry_days),
            (12_500_000, 7)
        );
        desk.close().await;
    }
    Ok(())
}

/// 20 concurrent check-ins of one user (across two replicas on
/// PostgreSQL): one award, 19 ALREADY_CHECKED_IN.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_checkins_award_once() -> R {
    for backend in backends() {
        let replicas = if backend == Backend::Postgres { 2 } else { 1 };
        let desk = Desk::open(backend, replicas).await;
        let org = "racing-org";
        let answers =
            futures::future::join_all((0..20).map(|i| desk.check_in_on(i, org, "racer"))).await;
        let ok = answers.iter().filter(|(s, _)| *s == 200).count();
        let refused = answers
            .iter()
            .filter(|(s, b)| *s == 409 && code(b) == "ALREADY_CHECKED_IN")
            .count();
        assert_eq!((ok, refused), (1, 19), "{answers:?}");
        let rows = invariants::rows_by_org(&desk.t.server.state.db).await;
        assert_eq!(rows[org].iter().filter(|r| r.kind == "checkin").count(), 1);
        invariants::check(&desk.t.server.state.db, desk.clock.now()).await;
        desk.close().await;
    }
    Ok(())
}

/// Plans: created and changed field by field with errors naming the field,
/// codes unique whatever their case, inactive plans hidden from the public
/// list yet kept for subscriptions, every write audited.
#[tokio::test]
async fn admin_plans_are_validated_partial_and_audited() -> R {
    use billing::entities::subscription;
    use reqwest::Method;
    use sea_orm::{ActiveValue::Set, EntityTrait};
    for backend in backends() {
        let desk = Desk::open(backend, 1).await;
        let plans_before = desk.admin_get("/admin/billing/plans").await.1["data"]
            .as_array()
            .unwrap()
            .len();
        let audits = desk.audit_count().await;

        let bad = [
            (json!({"name": "Team"}), "code"),
            (json!({"code": "SUB_TEAM"}), "name"),
            (json!({"code": "has space", "name": "Team"}), "code"),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "tier": -1}),
                "tier",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "tier": "two"}),
                "tier",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "price_monthly": -5}),
                "price_monthly",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "price_yearly": 1e300}),
                "price_yearly",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "price_yearly": 9_223_372_036_854_775_807_i64}),
                "price_yearly",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "credits_included": 12.5}),
                "credits_included",
            ),
            (json!({"code": "SUB_TEAM", "name": "x".repeat(256)}), "name"),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "currency": "dollars"}),
                "currency",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "features": "all"}),
                "features",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "active": "yes"}),
                "active",
            ),
            (
                json!({"code": "SUB_TEAM", "name": "Team", "creem_product_id": 7}),
                "creem_product_id",
            ),
        ];
        for (body, field) in bad {
            let (status, answer) = desk
                .admin_send(Method::POST, "/admin/billing/plans", body.clone())
                .await;
            assert_eq!((status, code(&answer)), (400, "INVALID_ARGUMENT"), "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{body} → {answer}"
            );
        }
        let r = desk
            .t
            .http
            .post(desk.t.rest("/admin/billing/plans"))
            .bearer_auth(desk.admin())
            .header("content-type", "application/json")
            .body("")
            .send()
            .await?;
        assert_eq!(r.status(), 400, "an empty body");
        let (_, list) = desk.admin_get("/admin/billing/plans").await;
        assert_eq!(list["data"].as_array().unwrap().len(), plans_before);
        assert_eq!(desk.audit_count().await, audits, "nothing written");

        // Created; the code is upper-cased and taken whatever the case.
        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/plans",
                json!({"code": "sub_team", "name": "Team", "tier": 2, "price_monthly": 1999,
                    "price_yearly": 19990, "credits_included": 20000, "features": ["Seats"],
                    "creem_product_id": "prod_team"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let plan = body["data"].clone();
        let id = plan["id"].as_str().unwrap().to_owned();
        assert_eq!(
            (
                plan["code"].clone(),
                plan["active"].clone(),
                plan["currency"].clone()
            ),
            (json!("SUB_TEAM"), json!(true), json!("USD"))
        );
        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/plans",
                json!({"code": "Sub_Team", "name": "Again"}),
            )
            .await;
        assert_eq!((status, code(&body)), (409, "PLAN_CODE_TAKEN"));
        let public = desk
            .t
            .http
            .get(desk.t.rest("/subscription/plans"))
            .send()
            .await?;
        let (_, public) = json_of(public).await?;
        assert!(
            public["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["code"] == "SUB_TEAM")
        );

        // A partial update changes only what it names.
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &format!("/admin/billing/plans/{id}"),
                json!({"name": "Team+"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["name"], "Team+");
        assert_eq!(body["data"]["price_monthly"], 1999);
        assert_eq!(body["data"]["features"], json!(["Seats"]));
        assert_eq!(body["data"]["creem_product_id"], "prod_team");
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &format!("/admin/billing/plans/{id}"),
                json!({"code": "sub_pro"}),
            )
            .await;
        assert_eq!((status, code(&body)), (409, "PLAN_CODE_TAKEN"));
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                "/admin/billing/plans/plan-nope",
                json!({"name": "X"}),
            )
            .await;
        assert_eq!((status, code(&body)), (404, "PLAN_NOT_FOUND"));
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &format!("/admin/billing/plans/{id}"),
                json!({"tier": 101}),
            )
            .await;
        assert_eq!((status, code(&body)), (400, "INVALID_ARGUMENT"));

        // Inactive: gone from the public list, kept for its subscribers.
        let org = "pro-subscriber";
        let org_id = desk.t.server.state.ledger.ensure_org(org).await?;
        let now = desk.clock.now();
        subscription::Entity::insert(subscription::ActiveModel {
            id: Set("sub_pro_1".into()),
            org_id: Set(org_id),
            plan_id: Set("sub-pro".into()),
            status: Set("active".into()),
            billing_period: Set("monthly".into()),
            channel: Set("stripe".into()),
            provider_subscription_id: Set(Some("sub_x".into())),
            current_period_start: Set(Some(now - TimeDelta::days(1))),
            current_period_end: Set(Some(now + TimeDelta::days(29))),
            cancel_at_period_end: Set(false),
            provider_updated_at: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .exec_without_returning(&desk.t.server.state.db)
        .await?;
        let (status, _) = desk
            .admin_send(
                Method::PUT,
                "/admin/billing/plans/sub-pro",
                json!({"active": false}),
            )
            .await;
        assert_eq!(status, 200);
        let public = desk
            .t
            .http
            .get(desk.t.rest("/subscription/plans"))
            .send()
            .await?;
        let (_, public) = json_of(public).await?;
        assert!(
            !public["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["code"] == "SUB_PRO")
        );
        let (_, admin_list) = desk.admin_get("/admin/billing/plans").await;
        assert!(
            admin_list["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["code"] == "SUB_PRO" && p["active"] == false)
        );
        let token = desk.user(org, "u1");
        let (_, info) = desk
            .call(0, Method::GET, "/user/credits/info", &token, None)
            .await;
        assert_eq!(info["active_subscription"]["id"], "SUB_PRO");

        // Over gRPC: the same rules.
        let mut admin = pb::admin_service_client::AdminServiceClient::new(desk.t.channel().await);
        let err = admin
            .create_plan(authed(
                &desk.admin(),
                pb::CreatePlanRequest {
                    code: "SUB_X".into(),
                    name: "X".into(),
                    price_monthly_cents: -1,
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("price_monthly"), "{err:?}");
        let updated = admin
            .update_plan(authed(
                &desk.admin(),
                pb::UpdatePlanRequest {
                    id: id.clone(),
                    set_features: true,
                    features: vec![],
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .plan
            .unwrap();
        assert!(updated.features.is_empty());
        assert_eq!(updated.name, "Team+");

        // The audit: one creation and four changes, with before and after.
        let (_, log) = desk
            .admin_get("/admin/audit?action=plan.update&limit=100")
            .await;
        assert_eq!(log["pagination"]["total"], 3);
        let (_, log) = desk.admin_get("/admin/audit?action=plan.create").await;
        assert_eq!(log["pagination"]["total"], 1);
        assert_eq!(log["data"][0]["before"], Value::Null);
        assert_eq!(log["data"][0]["after"]["code"], "SUB_TEAM");
        let (_, log) = desk
            .admin_get("/admin/audit?action=plan.update&limit=1")
            .await;
        assert_eq!(log["data"][0]["before"]["features"], json!(["Seats"]));
        assert_eq!(log["data"][0]["after"]["features"], json!([]));
        desk.close().await;
    }
    Ok(())
}

/// Coupons: each kind's bounds, codes unique whatever the case, bad input
/// naming its field and writing nothing, creations audited; REST and gRPC.
#[tokio::test]
async fn admin_coupons_are_validated_unique_and_audited() -> R {
    use reqwest::Method;
    for backend in backends() {
        let desk = Desk::open(backend, 1).await;
        let later = (desk.clock.now() + TimeDelta::days(30))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let past = (desk.clock.now() - TimeDelta::days(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let bad = [
            (json!({"kind": "percent_off", "value": 10}), "code"),
            (
                json!({"code": "", "kind": "percent_off", "value": 10}),
                "code",
            ),
            (
                json!({"code": "A B", "kind": "percent_off", "value": 10}),
                "code",
            ),
            (
                json!({"code": "X", "kind": "free_lunch", "value": 10}),
                "kind",
            ),
            (json!({"code": "X", "value": 10}), "kind"),
            (
                json!({"code": "X", "kind": "percent_off", "value": 101}),
                "value",
            ),
            (
                json!({"code": "X", "kind": "percent_off", "value": 0}),
                "value",
            ),
            (
                json!({"code": "X", "kind": "amount_off", "value": -5}),
                "value",
            ),
            (
                json!({"code": "X", "kind": "amount_off", "value": "5"}),
                "value",
            ),
            (
                json!({"code": "X", "kind": "bonus_credits", "value": 1e20}),
                "value",
            ),
            (
                json!({"code": "X", "kind": "bonus_credits", "value": 5, "max_redemptions": 0}),
                "max_redemptions",
            ),
            (
                json!({"code": "X", "kind": "bonus_credits", "value": 5, "max_redemptions": 1e10}),
                "max_redemptions",
            ),
            (
                json!({"code": "X", "kind": "bonus_credits", "value": 5, "expires_at": "soon"}),
                "expires_at",
            ),
            (
                json!({"code": "X", "kind": "bonus_credits", "value": 5, "expires_at": past}),
                "expires_at",
            ),
            (
                json!({"code": "X", "kind": "bonus_credits", "value": 5, "active": 1}),
                "active",
            ),
        ];
        for (body, field) in bad {
            let (status, answer) = desk
                .admin_send(Method::POST, "/admin/billing/coupons", body.clone())
                .await;
            assert_eq!((status, code(&answer)), (400, "INVALID_ARGUMENT"), "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{body} → {answer}"
            );
        }
        let (_, list) = desk.admin_get("/admin/billing/coupons").await;
        assert_eq!(list["data"], json!([]), "nothing written");
        assert_eq!(desk.audit_count().await, 0);

        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/coupons",
                json!({"code": "spring-10", "kind": "percent_off", "value": 10,
                    "max_redemptions": 3, "expires_at": later}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let c = &body["data"];
        assert_eq!(
            (
                c["code"].clone(),
                c["active"].clone(),
                c["redeemed_count"].clone(),
                c["max_redemptions"].clone()
            ),
            (json!("SPRING-10"), json!(true), json!(0), json!(3))
        );
        assert_eq!(c["expires_at"].as_str().unwrap()[..19], later[..19]);
        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/coupons",
                json!({"code": "Spring-10", "kind": "bonus_credits", "value": 50}),
            )
            .await;
        assert_eq!((status, code(&body)), (409, "COUPON_CODE_TAKEN"));

        // gRPC: the same rules, and the listing with both kinds.
        let mut admin = pb::admin_service_client::AdminServiceClient::new(desk.t.channel().await);
        let err = admin
            .create_coupon(authed(
                &desk.admin(),
                pb::CreateCouponRequest {
                    code: "SPRING-10".into(),
                    kind: "amount_off".into(),
                    value: 500,
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (tonic::Code::AlreadyExists, "COUPON_CODE_TAKEN")
        );
        let made = admin
            .create_coupon(authed(
                &desk.admin(),
                pb::CreateCouponRequest {
                    code: "welcome".into(),
                    kind: "bonus_credits".into(),
                    value: 50,
                    active: Some(false),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .coupon
            .unwrap();
        assert_eq!((made.code.as_str(), made.active), ("WELCOME", false));
        let listed = admin
            .list_coupons(authed(&desk.admin(), pb::ListCouponsRequest {}))
            .await?
            .into_inner()
            .coupons;
        assert_eq!(listed.len(), 2);
        let (_, log) = desk.admin_get("/admin/audit?action=coupon.create").await;
        assert_eq!(log["pagination"]["total"], 2);
        assert_eq!(log["data"][1]["after"]["code"], "SPRING-10");
        assert_eq!(log["data"][1]["target"], "SPRING-10");

        // Updates: switch off, limit, expiry; never code, kind or value.
        let id = c["id"].as_str().unwrap().to_string();
        let path = format!("/admin/billing/coupons/{id}");
        for (body, field) in [
            (json!({"code": "OTHER"}), "code"),
            (json!({"value": 50}), "value"),
            (json!({"max_redemptions": 0}), "max_redemptions"),
            (json!({"expires_at": past}), "expires_at"),
            (json!({"active": "no"}), "active"),
        ] {
            let (status, answer) = desk.admin_send(Method::PUT, &path, body.clone()).await;
            assert_eq!((status, code(&answer)), (400, "INVALID_ARGUMENT"), "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{body} → {answer}"
            );
        }
        let (status, answer) = desk
            .admin_send(
                Method::PUT,
                "/admin/billing/coupons/coupon-nope",
                json!({"active": false}),
            )
            .await;
        assert_eq!((status, code(&answer)), (404, "COUPON_NOT_FOUND"));
        assert_eq!(desk.audit_count().await, 2, "refused updates write nothing");
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &path,
                json!({"active": false, "max_redemptions": 10}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let u = &body["data"];
        assert_eq!(
            (
                u["code"].clone(),
                u["value"].clone(),
                u["active"].clone(),
                u["max_redemptions"].clone(),
                u["expires_at"].clone()
            ),
            (
                json!("SPRING-10"),
                json!(10),
                json!(false),
                json!(10),
                c["expires_at"].clone()
            ),
            "only the fields given change"
        );
        let switched_on = admin
            .update_coupon(authed(
                &desk.admin(),
                pb::UpdateCouponRequest {
                    id: made.id.clone(),
                    active: Some(true),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .coupon
            .unwrap();
        assert_eq!((switched_on.active, switched_on.value), (true, 50));
        let (_, log) = desk.admin_get("/admin/audit?action=coupon.update").await;
        assert_eq!(log["pagination"]["total"], 2);
        assert_eq!(log["data"][1]["before"]["active"], true);
        assert_eq!(log["data"][1]["after"]["active"], false);
        desk.close().await;
    }
    Ok(())
}

/// Packs: created and changed field by field, codes unique whatever the
/// case, inactive packs hidden from the public list, every write audited.
#[tokio::test]
async fn admin_packs_are_validated_partial_and_audited() -> R {
    use reqwest::Method;
    for backend in backends() {
        let desk = Desk::open(backend, 1).await;
        let bad = [
            (json!({"name": "Big", "credits": 10}), "code"),
            (json!({"code": "PACK_BIG", "credits": 10}), "name"),
            (json!({"code": "PACK_BIG", "name": "Big"}), "credits"),
            (
                json!({"code": "PACK_BIG", "name": "Big", "credits": 0}),
                "credits",
            ),
            (
                json!({"code": "PACK_BIG", "name": "Big", "credits": 10, "price_cents": -1}),
                "price",
            ),
            (
                json!({"code": "PACK_BIG", "name": "Big", "credits": 1e15}),
                "credits",
            ),
            (
                json!({"code": "PACK_BIG", "name": "Big", "credits": 10, "limit_per_cycle": -1}),
                "limit_per_cycle",
            ),
            (
                json!({"code": "PACK_BIG", "name": "Big", "credits": 10, "lot_expiry_days": 0}),
                "lot_expiry_days",
            ),
            (
                json!({"code": "PACK_BIG", "name": "Big", "credits": 10, "currency": "euro"}),
                "currency",
            ),
            (
                json!({"code": "PACK BIG", "name": "Big", "credits": 10}),
                "code",
            ),
        ];
        for (body, field) in bad {
            let (status, answer) = desk
                .admin_send(Method::POST, "/admin/billing/packs", body.clone())
                .await;
            assert_eq!((status, code(&answer)), (400, "INVALID_ARGUMENT"), "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{body} → {answer}"
            );
        }
        let (_, list) = desk.admin_get("/admin/billing/packs").await;
        assert_eq!(list["data"].as_array().unwrap().len(), 3, "nothing written");
        assert_eq!(desk.audit_count().await, 0);

        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/packs",
                json!({"code": "pack_big", "name": "Big", "credits": 5000, "price_cents": 39999,
                    "limit_per_cycle": 1, "lot_expiry_days": 90}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let id = body["data"]["id"].as_str().unwrap().to_owned();
        assert_eq!(body["data"]["code"], "PACK_BIG");
        assert_eq!(body["data"]["price"], 399.99);
        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/packs",
                json!({"code": "Pack_Big", "name": "Again", "credits": 1}),
            )
            .await;
        assert_eq!((status, code(&body)), (409, "PACK_CODE_TAKEN"));
        let public = desk
            .t
            .http
            .get(desk.t.rest("/credits/packs"))
            .send()
            .await?;
        let (_, public) = json_of(public).await?;
        assert!(
            public["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["code"] == "PACK_BIG")
        );

        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &format!("/admin/billing/packs/{id}"),
                json!({"active": false}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (
                body["data"]["credits"].clone(),
                body["data"]["lot_expiry_days"].clone()
            ),
            (json!(5000), json!(90)),
            "only `active` changed"
        );
        let public = desk
            .t
            .http
            .get(desk.t.rest("/credits/packs"))
            .send()
            .await?;
        let (_, public) = json_of(public).await?;
        assert!(
            !public["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["code"] == "PACK_BIG")
        );
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                "/admin/billing/packs/pack-nope",
                json!({"name": "X"}),
            )
            .await;
        assert_eq!((status, code(&body)), (404, "PACK_NOT_FOUND"));
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &format!("/admin/billing/packs/{id}"),
                json!({"code": "PACK_1"}),
            )
            .await;
        assert_eq!((status, code(&body)), (409, "PACK_CODE_TAKEN"));

        let mut admin = pb::admin_service_client::AdminServiceClient::new(desk.t.channel().await);
        let packs = admin
            .list_packs(authed(&desk.admin(), pb::AdminListPacksRequest {}))
            .await?
            .into_inner()
            .packs;
        assert_eq!(packs.len(), 4);
        let err = admin
            .update_pack(authed(
                &desk.admin(),
                pb::UpdatePackRequest {
                    id: id.clone(),
                    credits: Some(-3),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let (_, log) = desk.admin_get("/admin/audit?action=pack.update").await;
        assert_eq!(log["pagination"]["total"], 1);
        assert_eq!(log["data"][0]["before"]["active"], true);
        assert_eq!(log["data"][0]["after"]["active"], false);
        desk.close().await;
    }
    Ok(())
}

/// What `ai_tokens` usage of 1M tokens on `model` costs on replica `i`,
/// as a Consume there charges it.
async fn charged(desk: &Desk, i: usize, org: &str, model: &str, key: &str) -> i64 {
    let addr = match i % (desk.replicas.len() + 1) {
        0 => desk.t.server.grpc_addr,
        n => desk.replicas[n - 1].grpc_addr,
    };
    let mut usage = pb::usage_service_client::UsageServiceClient::new(common::connect(addr).await);
    let now = desk.clock.now().timestamp();
    let service = desk
        .t
        .keys
        .issue("svc", "internal", Role::Service, now, 3600);
    usage
        .consume(authed(
            &service,
            pb::ConsumeRequest {
                org_id: org.into(),
                meter: "ai_tokens".into(),
                quantity: 1_000_000,
                model: Some(model.into()),
                idempotency_key: key.into(),
                description: None,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .charged_micros
}

/// Rates: validated, unique per meter and model, audited; a default rate
/// stays; a change prices usage at once on the replica that took it and
/// on every other replica within `RATE_REFRESH_SECONDS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_rates_are_validated_keep_a_default_and_reprice_every_replica() -> R {
    use reqwest::Method;
    const CR: i64 = 1_000_000;
    for backend in backends() {
        let replicas = if backend == Backend::Postgres { 2 } else { 1 };
        let desk = Desk::open_with(backend, replicas, &[("RATE_REFRESH_SECONDS", "1")]).await;
        let org = "metered";
        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/credits/manual",
                json!({"org_id": org, "amount": 10000, "reason": "usage budget"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let audits = desk.audit_count().await;
        let (_, seeded) = desk.admin_get("/admin/billing/rates").await;
        assert_eq!(seeded["data"].as_array().unwrap().len(), 5, "{seeded}");

        let bad = [
            (json!({}), "meter"),
            (json!({"meter": "bytes", "credits_per_unit": 1}), "meter"),
            (json!({"meter": "ai_tokens"}), "credits_per_unit"),
            (
                json!({"meter": "ai_tokens", "model": "m", "credits_per_unit": -1}),
                "credits_per_unit",
            ),
            (
                json!({"meter": "ai_tokens", "model": "m", "credits_per_unit": "1"}),
                "credits_per_unit",
            ),
            (
                json!({"meter": "ai_tokens", "model": "m", "credits_per_unit": 1e13}),
                "credits_per_unit",
            ),
            (
                json!({"meter": "ai_tokens", "model": "m", "credits_per_unit": 0.0000001}),
                "credits_per_unit",
            ),
            (
                json!({"meter": "ai_tokens", "model": "two words", "credits_per_unit": 1}),
                "model",
            ),
            (
                json!({"meter": "ai_tokens", "model": "m".repeat(129), "credits_per_unit": 1}),
                "model",
            ),
            (
                json!({"meter": "ai_tokens", "model": "m", "credits_per_unit": 1, "description": "d".repeat(256)}),
                "description",
            ),
            (
                json!({"meter": "ai_tokens", "model": "m", "credits_per_unit": 1, "active": 1}),
                "active",
            ),
            (json!({"meter": 7, "credits_per_unit": 1}), "meter"),
        ];
        for (body, field) in bad {
            let (status, answer) = desk
                .admin_send(Method::POST, "/admin/billing/rates", body.clone())
                .await;
            assert_eq!((status, code(&answer)), (400, "INVALID_ARGUMENT"), "{body}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{body} → {answer}"
            );
        }
        for body in [
            json!({"meter": "ai_tokens", "credits_per_unit": 1}),
            json!({"meter": "ai_tokens", "model": "gpt-4o", "credits_per_unit": 1}),
        ] {
            let (status, answer) = desk
                .admin_send(Method::POST, "/admin/billing/rates", body.clone())
                .await;
            assert_eq!((status, code(&answer)), (409, "RATE_TAKEN"), "{body}");
        }
        assert_eq!(desk.audit_count().await, audits, "nothing written");

        // A per-model rate prices usage at once on this replica.
        let (status, body) = desk
            .admin_send(
                Method::POST,
                "/admin/billing/rates",
                json!({"meter": "ai_tokens", "model": "llama-3", "credits_per_unit": 3.5,
                    "description": "Llama 3, per 1M tokens"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let rate = body["data"].clone();
        assert_eq!(
            (
                rate["unit"].as_str(),
                rate["credits_per_unit"].as_f64(),
                rate["active"].as_bool()
            ),
            (Some("1M tokens"), Some(3.5), Some(true))
        );
        let id = rate["id"].as_str().unwrap().to_owned();
        assert_eq!(
            charged(&desk, 0, org, "llama-3", "k1").await,
            3 * CR + CR / 2
        );

        // Repriced: here at once, on the other replica within its refresh.
        let (status, body) = desk
            .admin_send(
                Method::PUT,
                &format!("/admin/billing/rates/{id}"),
                json!({"credits_per_unit": 4}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["data"]["description"], "Llama 3, per 1M tokens",
            "partial"
        );
        assert_eq!(charged(&desk, 0, org, "llama-3", "k2").await, 4 * CR);
        if replicas > 1 {
            let mut seen = 0;
            for n in 0..100 {
                seen = charged(&desk, 1, org, "llama-3", &format!("poll-{n}")).await;
                if seen == 4 * CR {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(seen, 4 * CR, "the other replica prices with the new rate");
        }

        // The defaults stay; meter and model do not change; unknown ids.
        let (_, all) = desk.admin_get("/admin/billing/rates").await;
        let default_id = all["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["meter"] == "ai_tokens" && r["model"].is_null())
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let at = |id: &str| format!("/admin/billing/rates/{id}");
        let (status, body) = desk
            .admin_send(Method::PUT, &at(&default_id), json!({"active": false}))
            .await;
        assert_eq!(
            (status, code(&body)),
            (409, "DEFAULT_RATE_REQUIRED"),
            "{body}"
        );
        let (status, body) = desk
            .call(0, Method::DELETE, &at(&default_id), &desk.admin(), None)
            .await;
        assert_eq!(
            (status, code(&body)),
            (409, "DEFAULT_RATE_REQUIRED"),
            "{body}"
        );
        let (status, body) = desk
            .admin_send(Method::PUT, &at(&id), json!({"model": "other"}))
            .await;
        assert_eq!((status, code(&body)), (400, "INVALID_ARGUMENT"), "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("model"),
            "{body}"
        );
        let (status, body) = desk
            .admin_send(Method::PUT, &at("rate-404"), json!({"credits_per_unit": 1}))
            .await;
        assert_eq!((status, code(&body)), (404, "RATE_NOT_FOUND"), "{body}");

        // Switched off, a model falls back to the default (and leaves the
        // public listing); removed, likewise.
        let (_, public) = desk.admin_get("/credits/rates").await;
        let listed = |public: &Value, model: &str| {
            public["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["model"] == model)
        };
        assert!(listed(&public, "gpt-4o"));
        let gpt = all["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == "gpt-4o")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, _) = desk
            .admin_send(Method::PUT, &at(&gpt), json!({"active": false}))
            .await;
        assert_eq!(status, 200);
        let (_, public) = desk.admin_get("/credits/rates").await;
        assert!(!listed(&public, "gpt-4o"));
        assert_eq!(charged(&desk, 0, org, "gpt-4o", "k3").await, 2 * CR);
        let (status, body) = desk
            .call(0, Method::DELETE, &at(&id), &desk.admin(), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(charged(&desk, 0, org, "llama-3", "k4").await, 2 * CR);
        let (status, body) = desk
            .call(0, Method::DELETE, &at(&id), &desk.admin(), None)
            .await;
        assert_eq!((status, code(&body)), (404, "RATE_NOT_FOUND"), "{body}");

        // Over gRPC: list, reprice a default, refuse to remove one.
        let mut admin = pb::admin_service_client::AdminServiceClient::new(desk.t.channel().await);
        let token = desk.admin();
        let rates = admin
            .list_rates(authed(&token, pb::AdminListRatesRequest {}))
            .await?
            .into_inner()
            .rates;
        assert_eq!(rates.len(), 5, "five seeded, one added, one removed");
        let repriced = admin
            .update_rate(authed(
                &token,
                pb::UpdateRateRequest {
                    id: default_id.clone(),
                    credits_per_unit_micros: Some(3 * CR),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .rate
            .unwrap();
        assert_eq!(repriced.credits_per_unit_micros, 3 * CR);
        assert_eq!(charged(&desk, 0, org, "no-such-model", "k5").await, 3 * CR);
        let refused = admin
            .delete_rate(authed(
                &token,
                pb::DeleteRateRequest {
                    id: default_id.clone(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason(&refused), "DEFAULT_RATE_REQUIRED");

        for (action, n) in [("rate.create", 1), ("rate.update", 3), ("rate.delete", 1)] {
            let (_, log) = desk
                .admin_get(&format!("/admin/audit?action={action}"))
                .await;
            assert_eq!(log["pagination"]["total"], n, "{action}: {log}");
        }
        let (_, log) = desk.admin_get("/admin/audit?action=rate.delete").await;
        let entry = &log["data"][0];
        assert_eq!(entry["before"]["model"], "llama-3", "{entry}");
        assert!(entry["after"].is_null(), "{entry}");
        invariants::check(&desk.t.server.state.db, desk.clock.now()).await;
        desk.close().await;
    }
    Ok(())
}

/// Every admin write refuses a body that is empty, not JSON or not an
/// object with a 400 that says what is wrong, and writes nothing.
#[tokio::test]
async fn every_admin_write_refuses_an_empty_or_shapeless_body() -> R {
    for backend in backends() {
        let desk = Desk::open(backend, 1).await;
        let routes = [
            (reqwest::Method::POST, "/admin/billing/plans"),
            (reqwest::Method::PUT, "/admin/billing/plans/sub-pro"),
            (reqwest::Method::POST, "/admin/billing/coupons"),
            (reqwest::Method::PUT, "/admin/billing/coupons/coupon-x"),
            (reqwest::Method::POST, "/admin/billing/packs"),
            (reqwest::Method::PUT, "/admin/billing/packs/pack-1"),
            (reqwest::Method::POST, "/admin/billing/rates"),
            (reqwest::Method::PUT, "/admin/billing/rates/rate-ai-tokens"),
            (reqwest::Method::PUT, "/admin/checkin/config"),
            (reqwest::Method::POST, "/admin/credits/manual"),
        ];
        for (method, path) in routes {
            for raw in ["", "{", "[]", "\"plan\"", "null", "42"] {
                let r = desk
                    .t
                    .http
                    .request(method.clone(), desk.t.rest(path))
                    .bearer_auth(desk.admin())
                    .header("content-type", "application/json")
                    .body(raw)
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let answer: Value = r.json().await?;
                assert_eq!(
                    (status, code(&answer)),
                    (400, "INVALID_ARGUMENT"),
                    "{method} {path} with body {raw:?} → {answer}"
                );
                assert!(
                    !answer["message"].as_str().unwrap_or("").is_empty(),
                    "{method} {path} {raw:?}: the error says what is wrong"
                );
            }
        }
        assert_eq!(desk.audit_count().await, 0, "nothing written");
        desk.close().await;
    }
    Ok(())
}

/// Admin writes that race on one database wait for each other: none fails
/// with "database is locked" (SQLite) or a 500, and each is audited.
#[tokio::test]
async fn racing_admin_writes_all_succeed() -> R {
    use reqwest::Method;
    for backend in backends() {
        let desk = Arc::new(Desk::open(backend, 1).await);
        let mut tasks = Vec::new();
        for i in 0..24 {
            let desk = desk.clone();
            tasks.push(tokio::spawn(async move {
                let (method, path, body) = match i % 3 {
                    0 => (
                        Method::PUT,
                        "/admin/billing/packs/pack-1".to_owned(),
                        json!({"price_cents": 1000 + i}),
                    ),
                    1 => (
                        Method::PUT,
                        "/admin/billing/plans/sub-pro".to_owned(),
                        json!({"description": format!("edit {i}")}),
                    ),
                    _ => (
                        Method::POST,
                        "/admin/billing/coupons".to_owned(),
                        json!({"code": format!("RACE-{i}"), "kind": "bonus_credits", "value": 5}),
                    ),
                };
                desk.admin_send(method.clone(), &path, body).await
            }));
        }
        for task in tasks {
            let (status, body) = task.await.expect("task");
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(desk.audit_count().await, 24);
        match Arc::try_unwrap(desk) {
            Ok(desk) => desk.close().await,
            Err(_) => panic!("desk still shared"),
        }
    }
    Ok(())
}
