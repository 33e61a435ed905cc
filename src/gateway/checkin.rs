//! REST ⇄ gRPC for check-in and its configuration. Credits are whole
//! credits as exact JSON numbers, as everywhere on REST.

use axum::{extract::State, http::HeaderMap};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::{ApiResult, Gateway, JsonBody, Num, credits, envelope, grpc_request};
use crate::pb;

/// What a check-in gave: credits (with the streak bonus), the streak
/// after it, and the balance after it.
#[derive(Serialize, ToSchema)]
#[schema(as = Checkin)]
pub(super) struct CheckinJson {
    credits_awarded: Num,
    streak: i32,
    #[schema(format = DateTime)]
    next_checkin_at: Option<String>,
    balance: Num,
}

pub async fn checkin(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::checkin_service_client::CheckinServiceClient::new(gw.channel);
    let r = client
        .checkin(grpc_request(&headers, pb::CheckinRequest {}))
        .await?
        .into_inner();
    Ok(envelope::ok(CheckinJson {
        credits_awarded: Num::credits(r.credits_awarded_micros),
        streak: r.streak,
        next_checkin_at: credits::rfc3339(r.next_checkin_at),
        balance: Num::credits(r.balance_micros),
    }))
}

#[derive(Serialize, ToSchema)]
#[schema(as = CheckinStatus)]
pub(super) struct StatusJson {
    enabled: bool,
    checked_in_today: bool,
    streak: i32,
    #[schema(format = DateTime)]
    next_checkin_at: Option<String>,
    credits_per_day: Num,
    streak_bonus: Num,
}

pub async fn status(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::checkin_service_client::CheckinServiceClient::new(gw.channel);
    let r = client
        .get_checkin_status(grpc_request(&headers, pb::GetCheckinStatusRequest {}))
        .await?
        .into_inner();
    Ok(envelope::ok(StatusJson {
        enabled: r.enabled,
        checked_in_today: r.checked_in_today,
        streak: r.streak,
        next_checkin_at: credits::rfc3339(r.next_checkin_at),
        credits_per_day: Num::credits(r.credits_per_day_micros),
        streak_bonus: Num::credits(r.streak_bonus_micros),
    }))
}

#[derive(Serialize, ToSchema)]
#[schema(as = CheckinConfig)]
pub(super) struct ConfigJson {
    enabled: bool,
    credits_per_day: Num,
    lot_expiry_days: i32,
    streak_bonus: Num,
}

fn config_json(c: pb::CheckinConfig) -> ConfigJson {
    ConfigJson {
        enabled: c.enabled,
        credits_per_day: Num::credits(c.credits_per_day_micros),
        lot_expiry_days: c.lot_expiry_days,
        streak_bonus: Num::credits(c.streak_bonus_micros),
    }
}

pub async fn get_config(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .get_checkin_config(grpc_request(&headers, pb::GetCheckinConfigRequest {}))
        .await?
        .into_inner();
    Ok(envelope::ok(config_json(r)))
}

/// The whole configuration (a PUT replaces it; an omitted `streak_bonus`
/// is 0).
#[derive(Deserialize, ToSchema)]
#[schema(as = CheckinConfigBody)]
pub struct ConfigBody {
    enabled: bool,
    #[schema(schema_with = credits_per_day)]
    credits_per_day: Box<RawValue>,
    #[schema(minimum = 1, maximum = 3650)]
    #[serde(deserialize_with = "super::whole::required")]
    lot_expiry_days: i32,
    /// Extra credits on every day of a streak after the first
    #[serde(default)]
    #[schema(schema_with = streak_bonus)]
    streak_bonus: Option<Box<RawValue>>,
}

fn credits_per_day() -> utoipa::openapi::ObjectBuilder {
    super::openapi::credits_at_least_0(false)
}

fn streak_bonus() -> utoipa::openapi::ObjectBuilder {
    super::openapi::credits_at_least_0(true)
}

pub async fn put_config(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ConfigBody>,
) -> ApiResult {
    let request = pb::CheckinConfig {
        enabled: body.enabled,
        credits_per_day_micros: credits::credits_field("credits_per_day", &body.credits_per_day)?,
        lot_expiry_days: body.lot_expiry_days,
        streak_bonus_micros: match &body.streak_bonus {
            Some(raw) => credits::credits_field("streak_bonus", raw)?,
            None => 0,
        },
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .update_checkin_config(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(config_json(r)))
}
