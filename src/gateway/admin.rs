//! REST ⇄ gRPC for the operator routes: plans, coupons, packs, rates and
//! the audit log (role `admin`).

use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::openapi::one_of;
use serde_json::Value;

use super::{
    AdminPlanJson, ApiResult, Gateway, JsonBody, Num, RateJson,
    credits::{self, Params},
    envelope, grpc_request,
};
use crate::pb;

/// A plan's fields; prices are cents. On PUT only the fields given change
/// (an empty provider id clears it).
#[derive(Deserialize, Default, ToSchema)]
pub struct PlanBody {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    code: Option<String>,
    #[schema(min_length = 1, max_length = 255)]
    name: Option<String>,
    #[schema(max_length = 1000)]
    description: Option<String>,
    #[schema(minimum = 0, maximum = 100)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    tier: Option<i32>,
    /// Cents
    #[schema(minimum = 0, maximum = 1000000000000_i64)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    price_monthly: Option<i64>,
    /// Cents
    #[schema(minimum = 0, maximum = 1000000000000_i64)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    price_yearly: Option<i64>,
    #[schema(pattern = "^[A-Za-z]{3}$")]
    currency: Option<String>,
    #[schema(minimum = 0, maximum = 1000000000000_i64)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    credits_included: Option<i64>,
    #[schema(schema_with = features)]
    features: Option<Vec<String>>,
    active: Option<bool>,
    #[schema(max_length = 255)]
    stripe_price_monthly: Option<String>,
    #[schema(max_length = 255)]
    stripe_price_yearly: Option<String>,
    #[schema(max_length = 255)]
    creem_product_id: Option<String>,
}

/// A plan's feature list: up to 50 lines of up to 255 characters.
fn features() -> utoipa::openapi::schema::ArrayBuilder {
    use utoipa::openapi::{
        ObjectBuilder, Type,
        schema::{ArrayBuilder, SchemaType},
    };
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .max_items(Some(50))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255)),
        )
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

/// The `action` filter of the audit log.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ActionFilter {
    /// Only entries of this action (plan.create, coupon.create,
    /// checkin_config.update, manual_adjust, ...)
    #[param(max_length = 64)]
    action: Option<String>,
}

impl ActionFilter {
    fn parse(params: &std::collections::HashMap<String, String>) -> Option<String> {
        Self {
            action: credits::text_param(params, "action"),
        }
        .action
    }
}

/// One entry of the audit log: who changed what, with the row before and
/// after.
#[derive(Serialize, ToSchema)]
#[schema(as = AuditEntry)]
pub(super) struct AuditJson {
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
        page: Some(credits::PageQuery::parse(&params)?),
        org_id: credits::OrgFilter::parse(&params),
        action: ActionFilter::parse(&params),
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

#[derive(Serialize, ToSchema)]
#[schema(as = Coupon)]
pub(super) struct CouponJson {
    id: String,
    code: String,
    #[schema(schema_with = coupon_kinds)]
    kind: String,
    value: i64,
    max_redemptions: Option<i32>,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    active: bool,
    redeemed_count: i32,
    #[schema(format = DateTime)]
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

#[derive(Deserialize, ToSchema)]
pub struct CouponBody {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    code: String,
    #[schema(schema_with = coupon_kinds)]
    kind: String,
    /// percent_off: 1-100 percent; amount_off: cents; bonus_credits: whole
    /// credits
    #[schema(minimum = 1, maximum = 1000000000000_i64)]
    #[serde(deserialize_with = "super::whole::required")]
    value: i64,
    #[schema(minimum = 1, maximum = 2147483647)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    max_redemptions: Option<i32>,
    /// In the future
    #[serde(default)]
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[serde(default)]
    active: Option<bool>,
}

fn coupon_kinds() -> utoipa::openapi::ObjectBuilder {
    one_of(
        crate::coupons::Kind::ALL.map(crate::coupons::Kind::as_str),
        false,
    )
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
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CouponUpdateBody {
    #[serde(default)]
    active: Option<bool>,
    #[schema(minimum = 1, maximum = 2147483647)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    max_redemptions: Option<i32>,
    /// In the future
    #[serde(default)]
    #[schema(format = DateTime)]
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
#[derive(Serialize, ToSchema)]
#[schema(as = AdminPack)]
pub(super) struct AdminPackJson {
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
#[derive(Deserialize, Default, ToSchema)]
pub struct PackBody {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    code: Option<String>,
    #[schema(min_length = 1, max_length = 255)]
    name: Option<String>,
    #[schema(minimum = 1, maximum = 1000000000000_i64)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    credits: Option<i64>,
    #[schema(minimum = 0, maximum = 1000000000000_i64)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    price_cents: Option<i64>,
    #[schema(pattern = "^[A-Za-z]{3}$")]
    currency: Option<String>,
    /// Orders of this pack one organization may place per billing cycle
    #[schema(minimum = 0, maximum = 1000)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    limit_per_cycle: Option<i32>,
    #[schema(minimum = 1, maximum = 3650)]
    #[serde(default, deserialize_with = "super::whole::optional")]
    lot_expiry_days: Option<i32>,
    active: Option<bool>,
    #[schema(max_length = 255)]
    stripe_price_id: Option<String>,
    #[schema(max_length = 255)]
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
#[derive(Serialize, ToSchema)]
#[schema(as = AdminRate)]
pub(super) struct AdminRateJson {
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
#[derive(Deserialize, Default, ToSchema)]
pub struct RateBody {
    #[schema(schema_with = maybe_meter)]
    meter: Option<String>,
    /// Omit for the meter's default rate
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:/-]+$")]
    model: Option<String>,
    /// Credits one unit (1 GB, 1M tokens) costs
    #[schema(schema_with = credits_per_unit)]
    credits_per_unit: Option<Box<serde_json::value::RawValue>>,
    #[schema(max_length = 255)]
    description: Option<String>,
    /// A default rate cannot be switched off
    active: Option<bool>,
}

fn maybe_meter() -> utoipa::openapi::ObjectBuilder {
    one_of(
        crate::domain::Meter::ALL.map(crate::domain::Meter::as_str),
        true,
    )
}

fn credits_per_unit() -> utoipa::openapi::ObjectBuilder {
    super::openapi::credits_at_least_0(true)
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
