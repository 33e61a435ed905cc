//! `AdminService`: Operator endpoints (role `admin`).

use tonic::{Request, Response, Status};

use super::{convert, input};
use crate::{
    audit,
    auth::caller,
    catalog::{
        self,
        packs::{self, PackInput},
        plans::{self, PlanInput},
        rates::{self, RateInput},
    },
    checkin, coupons,
    domain::MICROS_PER_CREDIT,
    error::Error,
    ledger::{AdjustInput, model::MAX_MICROS, reads},
    pb,
    state::AppState,
};

pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_plans(
        &self,
        _request: Request<pb::AdminListPlansRequest>,
    ) -> Result<Response<pb::AdminListPlansResponse>, Status> {
        let plans = catalog::list_plans(&self.state.db, true).await?;
        Ok(Response::new(pb::AdminListPlansResponse {
            plans: plans.into_iter().map(convert::plan).collect(),
        }))
    }

    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let input = PlanInput {
            code: Some(r.code),
            name: Some(r.name),
            description: Some(r.description),
            tier: Some(r.tier),
            price_monthly_cents: Some(r.price_monthly_cents),
            price_yearly_cents: Some(r.price_yearly_cents),
            currency: r.currency,
            credits_included: Some(r.credits_included),
            features: Some(r.features),
            active: r.active,
            stripe_price_monthly: r.stripe_price_monthly,
            stripe_price_yearly: r.stripe_price_yearly,
            creem_product_id: r.creem_product_id,
        };
        let plan = plans::create(&self.state.db, &actor, &input, self.state.clock.now()).await?;
        Ok(Response::new(pb::PlanResponse {
            plan: Some(convert::plan(plan)),
        }))
    }

    async fn update_plan(
        &self,
        request: Request<pb::UpdatePlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let id = input::required("id", &r.id, 64)?;
        let input = PlanInput {
            code: r.code,
            name: r.name,
            description: r.description,
            tier: r.tier,
            price_monthly_cents: r.price_monthly_cents,
            price_yearly_cents: r.price_yearly_cents,
            currency: r.currency,
            credits_included: r.credits_included,
            features: r.set_features.then_some(r.features),
            active: r.active,
            stripe_price_monthly: r.stripe_price_monthly,
            stripe_price_yearly: r.stripe_price_yearly,
            creem_product_id: r.creem_product_id,
        };
        let plan =
            plans::update(&self.state.db, &actor, &id, &input, self.state.clock.now()).await?;
        Ok(Response::new(pb::PlanResponse {
            plan: Some(convert::plan(plan)),
        }))
    }

    async fn list_packs(
        &self,
        _request: Request<pb::AdminListPacksRequest>,
    ) -> Result<Response<pb::AdminListPacksResponse>, Status> {
        let rows = packs::list_all(&self.state.db).await?;
        Ok(Response::new(pb::AdminListPacksResponse {
            packs: rows.into_iter().map(convert::pack).collect(),
        }))
    }

    async fn create_pack(
        &self,
        request: Request<pb::CreatePackRequest>,
    ) -> Result<Response<pb::PackResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let input = PackInput {
            code: Some(r.code),
            name: Some(r.name),
            credits: Some(r.credits),
            price_cents: Some(r.price_cents),
            currency: r.currency,
            limit_per_cycle: r.limit_per_cycle,
            lot_expiry_days: r.lot_expiry_days,
            active: r.active,
            stripe_price_id: r.stripe_price_id,
            creem_product_id: r.creem_product_id,
        };
        let pack = packs::create(&self.state.db, &actor, &input, self.state.clock.now()).await?;
        Ok(Response::new(pb::PackResponse {
            pack: Some(convert::pack(pack)),
        }))
    }

    async fn update_pack(
        &self,
        request: Request<pb::UpdatePackRequest>,
    ) -> Result<Response<pb::PackResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let id = input::required("id", &r.id, 64)?;
        let input = PackInput {
            code: r.code,
            name: r.name,
            credits: r.credits,
            price_cents: r.price_cents,
            currency: r.currency,
            limit_per_cycle: r.limit_per_cycle,
            lot_expiry_days: r.lot_expiry_days,
            active: r.active,
            stripe_price_id: r.stripe_price_id,
            creem_product_id: r.creem_product_id,
        };
        let pack =
            packs::update(&self.state.db, &actor, &id, &input, self.state.clock.now()).await?;
        Ok(Response::new(pb::PackResponse {
            pack: Some(convert::pack(pack)),
        }))
    }

    async fn list_coupons(
        &self,
        _request: Request<pb::ListCouponsRequest>,
    ) -> Result<Response<pb::ListCouponsResponse>, Status> {
        let rows = coupons::list(&self.state.db).await?;
        Ok(Response::new(pb::ListCouponsResponse {
            coupons: rows.into_iter().map(convert::coupon).collect(),
        }))
    }

    async fn create_coupon(
        &self,
        request: Request<pb::CreateCouponRequest>,
    ) -> Result<Response<pb::CouponResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let expires_at = r
            .expires_at
            .as_ref()
            .map(|t| input::timestamp("expires_at", t))
            .transpose()?;
        let new = coupons::NewCoupon {
            code: r.code,
            kind: r.kind,
            value: r.value,
            max_redemptions: r.max_redemptions,
            expires_at,
            active: r.active,
        };
        let c = coupons::create(&self.state.db, &actor, &new, self.state.clock.now()).await?;
        Ok(Response::new(pb::CouponResponse {
            coupon: Some(convert::coupon(c)),
        }))
    }

    async fn update_coupon(
        &self,
        request: Request<pb::UpdateCouponRequest>,
    ) -> Result<Response<pb::CouponResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let id = input::required("id", &r.id, 64)?;
        let expires_at = r
            .expires_at
            .as_ref()
            .map(|t| input::timestamp("expires_at", t))
            .transpose()?;
        let change = coupons::CouponChange {
            active: r.active,
            max_redemptions: r.max_redemptions,
            expires_at,
        };
        let c =
            coupons::update(&self.state.db, &actor, &id, &change, self.state.clock.now()).await?;
        Ok(Response::new(pb::CouponResponse {
            coupon: Some(convert::coupon(c)),
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::AdminListTransactionsRequest>,
    ) -> Result<Response<pb::AdminListTransactionsResponse>, Status> {
        let r = request.into_inner();
        let (limit, offset) = input::page(r.page.as_ref())?;
        let kind = input::transaction_type(r.r#type.as_deref())?;
        let org = input::optional("org_id", r.org_id.as_deref(), input::MAX_ID)?;
        let (rows, total) = reads::transactions(
            &self.state.ledger,
            &self.state.read_db,
            org.as_deref(),
            kind.as_deref(),
            limit,
            offset,
        )
        .await?;
        let page = convert::page_info(limit, offset, rows.len(), total);
        Ok(Response::new(pb::AdminListTransactionsResponse {
            transactions: rows.into_iter().map(convert::transaction).collect(),
            page: Some(page),
        }))
    }

    async fn manual_adjust(
        &self,
        request: Request<pb::ManualAdjustRequest>,
    ) -> Result<Response<pb::ManualAdjustResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let org = input::required("org_id", &r.org_id, input::MAX_ID)?;
        if r.amount_micros == 0 {
            return Err(Error::invalid("amount", "must not be zero").into());
        }
        if r.amount_micros.unsigned_abs() > MAX_MICROS.unsigned_abs() {
            return Err(Error::invalid(
                "amount",
                format!(
                    "must be at most {} credits either way",
                    MAX_MICROS / MICROS_PER_CREDIT
                ),
            )
            .into());
        }
        let reason = input::required("reason", &r.reason, input::MAX_TEXT)?;
        let expires_at = match &r.expires_at {
            None => None,
            Some(_) if r.amount_micros < 0 => {
                return Err(Error::invalid(
                    "expires_at",
                    "applies to grants (positive amounts) only",
                )
                .into());
            }
            Some(t) => {
                let at = input::timestamp("expires_at", t)?;
                if at <= self.state.clock.now() {
                    return Err(Error::invalid("expires_at", "must be in the future").into());
                }
                Some(at)
            }
        };
        let out = self
            .state
            .ledger
            .adjust(AdjustInput {
                org,
                amount: r.amount_micros,
                reason,
                expires_at,
                key: input::optional(
                    "idempotency_key",
                    r.idempotency_key.as_deref(),
                    input::MAX_ID,
                )?,
                actor,
            })
            .await?;
        Ok(Response::new(pb::ManualAdjustResponse {
            transaction_id: out.transaction_id,
            balance_micros: out.balance_micros,
            duplicate: out.duplicate,
        }))
    }

    async fn get_checkin_config(
        &self,
        _request: Request<pb::GetCheckinConfigRequest>,
    ) -> Result<Response<pb::CheckinConfig>, Status> {
        let c = checkin::config(&self.state.db).await?;
        Ok(Response::new(checkin_config(c)))
    }

    async fn update_checkin_config(
        &self,
        request: Request<pb::CheckinConfig>,
    ) -> Result<Response<pb::CheckinConfig>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let new = checkin::Config {
            enabled: r.enabled,
            credits_per_day_micros: r.credits_per_day_micros,
            lot_expiry_days: r.lot_expiry_days,
            streak_bonus_micros: r.streak_bonus_micros,
        };
        let c = checkin::update_config(&self.state, &actor, new).await?;
        Ok(Response::new(checkin_config(c)))
    }

    async fn list_audit_entries(
        &self,
        request: Request<pb::ListAuditEntriesRequest>,
    ) -> Result<Response<pb::ListAuditEntriesResponse>, Status> {
        let r = request.into_inner();
        let (limit, offset) = input::page(r.page.as_ref())?;
        let org = input::optional("org_id", r.org_id.as_deref(), input::MAX_ID)?;
        let action = input::optional("action", r.action.as_deref(), 64)?;
        let (rows, total) = audit::list(
            &self.state.db,
            org.as_deref(),
            action.as_deref(),
            limit,
            offset,
        )
        .await?;
        let page = convert::page_info(limit, offset, rows.len(), total);
        Ok(Response::new(pb::ListAuditEntriesResponse {
            entries: rows.into_iter().map(convert::audit_entry).collect(),
            page: Some(page),
        }))
    }

    async fn list_rates(
        &self,
        _request: Request<pb::AdminListRatesRequest>,
    ) -> Result<Response<pb::AdminListRatesResponse>, Status> {
        let rows = rates::list_all(&self.state.db).await?;
        Ok(Response::new(pb::AdminListRatesResponse {
            rates: rows.into_iter().map(convert::rate).collect(),
        }))
    }

    async fn create_rate(
        &self,
        request: Request<pb::CreateRateRequest>,
    ) -> Result<Response<pb::RateResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let input = RateInput {
            meter: Some(r.meter),
            model: r.model,
            credits_per_unit_micros: Some(r.credits_per_unit_micros),
            description: r.description,
            active: r.active,
        };
        let rate = rates::create(&self.state.db, &actor, &input, self.state.clock.now()).await?;
        self.repriced().await;
        Ok(Response::new(pb::RateResponse {
            rate: Some(convert::rate(rate)),
        }))
    }

    async fn update_rate(
        &self,
        request: Request<pb::UpdateRateRequest>,
    ) -> Result<Response<pb::RateResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let r = request.into_inner();
        let id = input::required("id", &r.id, 64)?;
        let input = RateInput {
            meter: None,
            model: None,
            credits_per_unit_micros: r.credits_per_unit_micros,
            description: r.description,
            active: r.active,
        };
        let rate =
            rates::update(&self.state.db, &actor, &id, &input, self.state.clock.now()).await?;
        self.repriced().await;
        Ok(Response::new(pb::RateResponse {
            rate: Some(convert::rate(rate)),
        }))
    }

    async fn delete_rate(
        &self,
        request: Request<pb::DeleteRateRequest>,
    ) -> Result<Response<pb::RateResponse>, Status> {
        let actor = caller(&request)?.sub.clone();
        let id = input::required("id", &request.get_ref().id, 64)?;
        let rate = rates::delete(&self.state.db, &actor, &id, self.state.clock.now()).await?;
        self.repriced().await;
        Ok(Response::new(pb::RateResponse {
            rate: Some(convert::rate(rate)),
        }))
    }
}

impl AdminApi {
    /// A rate changed: this replica prices with it at once (the others at
    /// their next periodic reload). The change is committed whatever
    /// happens here; a failed reload is retried by the periodic one.
    async fn repriced(&self) {
        if let Err(e) = self.state.ledger.reload_rates().await {
            tracing::warn!(error = %e, "could not reload rates after a change");
        }
    }
}

fn checkin_config(c: checkin::Config) -> pb::CheckinConfig {
    pb::CheckinConfig {
        enabled: c.enabled,
        credits_per_day_micros: c.credits_per_day_micros,
        lot_expiry_days: c.lot_expiry_days,
        streak_bonus_micros: c.streak_bonus_micros,
    }
}
