//! REST ⇄ gRPC for the operator routes: plans, coupons, packs, rates and
//! the audit log (role `admin`).

use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    AdminPlanJson, ApiResult, Gateway, JsonBody, Num, RateJson,
    credits::{self, Params},
    envelope, grpc_request,
};
use crate::pb;

/// A plan's fields; prices are cents. On PUT only the fields given change
/// (an empty provider id clears it).
#[derive(Deserialize, Default)]
pub struct PlanBody {
    code: Option<String>,
    name: Option<String>,
    description: Option<String>,
    tier: Option<i32>,
    price_monthly: Option<i64>,
    price_yearly: Option<i64>,
    currency: Option<String>,
    credits_included: Option<i64>,
    features: Option<Vec<String>>,
    active: Option<bool>,
    stripe_price_monthly: Option<String>,
    stripe_price_yearly: Option<String>,
    creem_product_id: Option<String>,
}

pub async fn create_plan(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<PlanBody>,
) -> ApiResult {
    let request = pb::CreatePlanRequest {
        code: b.code.unwrap_or_default(),
        name: b.name.unwrap_or_default(),
        description: b.description.unwrap_or_default(),
        tier: b.tier.unwrap_or_default(),
        price_monthly_cents: b.price_monthly.unwrap_or_default(),
        price_yearly_cents: b.price_yearly.unwrap_or_default(),
        currency: b.currency,
        credits_included: b.credits_included.unwrap_or_default(),
        features: b.features.unwrap_or_default(),
        active: b.active,
        stripe_price_monthly: b.stripe_price_monthly,
        stripe_price_yearly: b.stripe_price_yearly,
        creem_product_id: b.creem_product_id,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .create_plan(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.plan.map(AdminPlanJson::from)))
}

pub async fn update_plan(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PlanBody>,
) -> ApiResult {
    let request = pb::UpdatePlanRequest {
        id,
        code: b.code,
        name: b.name,
        description: b.description,
        tier: b.tier,
        price_monthly_cents: b.price_monthly,
        price_yearly_cents: b.price_yearly,
        currency: b.currency,
        credits_included: b.credits_included,
        set_features: b.features.is_some(),
        features: b.features.unwrap_or_default(),
        active: b.active,
        stripe_price_monthly: b.stripe_price_monthly,
        stripe_price_yearly: b.stripe_price_yearly,
        creem_product_id: b.creem_product_id,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .update_plan(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.plan.map(AdminPlanJson::from)))
}

#[derive(Serialize)]
struct AuditJson {
    id: i64,
    actor: String,
    action: String,
    org_id: Option<String>,
    target: String,
    reason: String,
    before: Value,
    after: Value,
    created_at: Option<String>,
}

pub async fn audit(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(params): Params,
) -> ApiResult {
    let request = pb::ListAuditEntriesRequest {
        page: Some(credits::page(&params)?),
        org_id: credits::text_param(&params, "org_id"),
        action: credits::text_param(&params, "action"),
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .list_audit_entries(grpc_request(&headers, request))
        .await?
        .into_inner();
    let json = |text: &str| serde_json::from_str(text).unwrap_or(Value::Null);
    let rows: Vec<_> = r
        .entries
        .into_iter()
        .map(|e| AuditJson {
            id: e.id,
            before: json(&e.before_json),
            after: json(&e.after_json),
            actor: e.actor,
            action: e.action,
            org_id: e.org_id,
            target: e.target,
            reason: e.reason,
            created_at: credits::rfc3339(e.created_at),
        })
        .collect();
    Ok(envelope::ok_page(rows, credits::pagination(r.page)))
}

#[derive(Serialize)]
struct CouponJson {
    id: String,
    code: String,
    kind: String,
    value: i64,
    max_redemptions: Option<i32>,
    expires_at: Option<String>,
    active: bool,
    redeemed_count: i32,
    created_at: Option<String>,
}

fn coupon_json(c: pb::Coupon) -> CouponJson {
    CouponJson {
        id: c.id,
        code: c.code,
        kind: c.kind,
        value: c.value,
        max_redemptions: c.max_redemptions,
        expires_at: credits::rfc3339(c.expires_at),
        active: c.active,
        redeemed_count: c.redeemed_count,
        created_at: credits::rfc3339(c.created_at),
    }
}

pub async fn list_coupons(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .list_coupons(grpc_request(&headers, pb::ListCouponsRequest {}))
        .await?
        .into_inner();
    Ok(envelope::ok(
        r.coupons.into_iter().map(coupon_json).collect::<Vec<_>>(),
    ))
}

#[derive(Deserialize)]
pub struct CouponBody {
    code: String,
    kind: String,
    value: i64,
    #[serde(default)]
    max_redemptions: Option<i32>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    active: Option<bool>,
}

pub async fn create_coupon(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<CouponBody>,
) -> ApiResult {
    let expires_at = credits::rfc3339_field("expires_at", b.expires_at.as_deref())?;
    let request = pb::CreateCouponRequest {
        code: b.code,
        kind: b.kind,
        value: b.value,
        max_redemptions: b.max_redemptions,
        expires_at,
        active: b.active,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .create_coupon(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.coupon.map(coupon_json)))
}

/// What `PUT /admin/billing/coupons/{id}` may change; a code, kind or
/// value in the body is refused by name rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouponUpdateBody {
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    max_redemptions: Option<i32>,
    #[serde(default)]
    expires_at: Option<String>,
}

pub async fn update_coupon(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<CouponUpdateBody>,
) -> ApiResult {
    let expires_at = credits::rfc3339_field("expires_at", b.expires_at.as_deref())?;
    let request = pb::UpdateCouponRequest {
        id,
        active: b.active,
        max_redemptions: b.max_redemptions,
        expires_at,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .update_coupon(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.coupon.map(coupon_json)))
}

/// A pack as admins see it: every field, inactive packs included; `price`
/// in currency units as on the public listing.
#[derive(Serialize)]
struct AdminPackJson {
    id: String,
    code: String,
    name: String,
    credits: i64,
    price: Num,
    currency: String,
    active: bool,
    limit_per_cycle: i32,
    lot_expiry_days: Option<i32>,
    stripe_price_id: Option<String>,
    creem_product_id: Option<String>,
}

fn pack_json(p: pb::Pack) -> AdminPackJson {
    let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
    AdminPackJson {
        id: p.id,
        code: p.code,
        name: p.name,
        credits: p.credits,
        price: Num::money(p.price_cents),
        currency: p.currency,
        active: p.active,
        limit_per_cycle: p.limit_per_cycle,
        lot_expiry_days: p.lot_expiry_days,
        stripe_price_id: none_if_empty(p.stripe_price_id),
        creem_product_id: none_if_empty(p.creem_product_id),
    }
}

pub async fn list_packs(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .list_packs(grpc_request(&headers, pb::AdminListPacksRequest {}))
        .await?
        .into_inner();
    Ok(envelope::ok(
        r.packs.into_iter().map(pack_json).collect::<Vec<_>>(),
    ))
}

/// A pack's fields; `price_cents` in cents. On PUT only the fields given
/// change (an empty provider id clears it).
#[derive(Deserialize, Default)]
pub struct PackBody {
    code: Option<String>,
    name: Option<String>,
    credits: Option<i64>,
    price_cents: Option<i64>,
    currency: Option<String>,
    limit_per_cycle: Option<i32>,
    lot_expiry_days: Option<i32>,
    active: Option<bool>,
    stripe_price_id: Option<String>,
    creem_product_id: Option<String>,
}

pub async fn create_pack(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<PackBody>,
) -> ApiResult {
    if b.code.is_none() || b.name.is_none() || b.credits.is_none() {
        let field = if b.code.is_none() {
            "code"
        } else if b.name.is_none() {
            "name"
        } else {
            "credits"
        };
        return Err(crate::error::Error::invalid(field, "is required").into());
    }
    let request = pb::CreatePackRequest {
        code: b.code.unwrap_or_default(),
        name: b.name.unwrap_or_default(),
        credits: b.credits.unwrap_or_default(),
        price_cents: b.price_cents.unwrap_or_default(),
        currency: b.currency,
        limit_per_cycle: b.limit_per_cycle,
        lot_expiry_days: b.lot_expiry_days,
        active: b.active,
        stripe_price_id: b.stripe_price_id,
        creem_product_id: b.creem_product_id,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .create_pack(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.pack.map(pack_json)))
}

pub async fn update_pack(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PackBody>,
) -> ApiResult {
    let request = pb::UpdatePackRequest {
        id,
        code: b.code,
        name: b.name,
        credits: b.credits,
        price_cents: b.price_cents,
        currency: b.currency,
        limit_per_cycle: b.limit_per_cycle,
        lot_expiry_days: b.lot_expiry_days,
        active: b.active,
        stripe_price_id: b.stripe_price_id,
        creem_product_id: b.creem_product_id,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .update_pack(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.pack.map(pack_json)))
}

/// A rate as admins see it: the public fields, and whether it is on
/// (switched-off rates are listed too).
#[derive(Serialize)]
struct AdminRateJson {
    #[serde(flatten)]
    rate: RateJson,
    active: bool,
}

fn rate_json(r: pb::Rate) -> AdminRateJson {
    let active = r.active;
    AdminRateJson {
        rate: RateJson::from(r),
        active,
    }
}

pub async fn list_rates(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .list_rates(grpc_request(&headers, pb::AdminListRatesRequest {}))
        .await?
        .into_inner();
    Ok(envelope::ok(
        r.rates.into_iter().map(rate_json).collect::<Vec<_>>(),
    ))
}

/// A rate's fields; `credits_per_unit` is a JSON number of credits (up to
/// 6 decimals). `meter` and `model` are for creation only.
#[derive(Deserialize, Default)]
pub struct RateBody {
    meter: Option<String>,
    model: Option<String>,
    credits_per_unit: Option<Box<serde_json::value::RawValue>>,
    description: Option<String>,
    active: Option<bool>,
}

impl RateBody {
    fn credits_per_unit_micros(&self) -> Result<Option<i64>, super::ApiError> {
        self.credits_per_unit
            .as_deref()
            .map(|raw| credits::credits_field("credits_per_unit", raw))
            .transpose()
    }
}

pub async fn create_rate(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<RateBody>,
) -> ApiResult {
    let Some(meter) = b.meter.clone() else {
        return Err(crate::error::Error::invalid("meter", "is required").into());
    };
    let Some(credits_per_unit_micros) = b.credits_per_unit_micros()? else {
        return Err(crate::error::Error::invalid("credits_per_unit", "is required").into());
    };
    let request = pb::CreateRateRequest {
        meter,
        model: b.model,
        credits_per_unit_micros,
        description: b.description,
        active: b.active,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .create_rate(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.rate.map(rate_json)))
}

pub async fn update_rate(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RateBody>,
) -> ApiResult {
    for (given, field) in [(b.meter.is_some(), "meter"), (b.model.is_some(), "model")] {
        if given {
            return Err(crate::error::Error::invalid(
                field,
                "cannot change: create a rate for the other meter or model",
            )
            .into());
        }
    }
    let request = pb::UpdateRateRequest {
        id,
        credits_per_unit_micros: b.credits_per_unit_micros()?,
        description: b.description,
        active: b.active,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .update_rate(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(r.rate.map(rate_json)))
}

pub async fn delete_rate(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .delete_rate(grpc_request(&headers, pb::DeleteRateRequest { id }))
        .await?
        .into_inner();
    Ok(envelope::ok(r.rate.map(rate_json)))
}
