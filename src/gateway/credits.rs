//! REST ⇄ gRPC for the credit routes: balance, transactions, monthly
//! statistics, `/user/credits/info` (seed 003's un-enveloped shape) and the
//! admin ledger routes. Credits travel as exact decimal JSON numbers.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tonic::Status;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiResult, Gateway, JsonBody, Num, Pagination, envelope, grpc_request};
use crate::{domain::parse_credits, error::Error, pb};

pub(super) type Params = Query<HashMap<String, String>>;

/// An optional integer query parameter, named in the error if malformed.
fn int_param(params: &HashMap<String, String>, name: &str) -> Result<Option<i32>, ApiError> {
    match params.get(name).map(|v| v.trim()) {
        None => Ok(None),
        Some("") => Err(Error::invalid(name, "is empty: give an integer or leave it out").into()),
        Some(v) => match v.parse::<i32>() {
            Ok(n) => Ok(Some(n)),
            // A well-formed integer past what the parameter can be.
            Err(_) if is_integer(v) => Err(Error::invalid(
                name,
                format!("`{v}` is out of range (at most {})", i32::MAX),
            )
            .into()),
            Err(_) => Err(Error::invalid(name, format!("`{v}` is not an integer")).into()),
        },
    }
}

/// Digits, optionally after a minus sign.
fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A text parameter, trimmed; empty is absent.
pub(super) fn text_param(params: &HashMap<String, String>, name: &str) -> Option<String> {
    params
        .get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// A page of a listing: `limit` rows from `offset` on (the service
/// checks the bounds).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PageQuery {
    /// Rows per page
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<i32>,
    /// Rows to skip
    #[param(minimum = 0, maximum = 2147483647, default = 0)]
    offset: Option<i32>,
}

impl PageQuery {
    pub(super) fn parse(params: &HashMap<String, String>) -> Result<pb::PageRequest, ApiError> {
        let query = Self {
            limit: int_param(params, "limit")?,
            offset: int_param(params, "offset")?,
        };
        Ok(pb::PageRequest {
            limit: query.limit,
            offset: query.offset.unwrap_or(0),
        })
    }
}

/// The `type` filter: absent, or one of the transaction types (checked by
/// the service); present but empty is refused.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct TypeFilter {
    /// Only rows of this transaction type
    #[param(rename = "type", schema_with = transaction_types)]
    kind: Option<String>,
}

fn transaction_types() -> utoipa::openapi::ObjectBuilder {
    super::openapi::one_of(
        crate::ledger::reads::TRANSACTION_TYPES.iter().copied(),
        false,
    )
}

impl TypeFilter {
    pub(super) fn parse(params: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
        let kind = match params.get("type").map(|v| v.trim()) {
            Some("") => {
                return Err(Error::invalid(
                    "type",
                    "is empty: give a transaction type or leave it out",
                )
                .into());
            }
            other => other.map(str::to_owned),
        };
        Ok(Self { kind }.kind)
    }
}

/// The `org_id` filter of the admin listings.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct OrgFilter {
    /// Only this organization
    #[param(max_length = 255)]
    org_id: Option<String>,
}

impl OrgFilter {
    pub(super) fn parse(params: &HashMap<String, String>) -> Option<String> {
        Self {
            org_id: text_param(params, "org_id"),
        }
        .org_id
    }
}

/// How many months of statistics.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct MonthsQuery {
    /// Months up to and including the current one
    #[param(minimum = 1, maximum = 24, default = 12)]
    months: Option<i32>,
}

pub(super) fn rfc3339(t: Option<prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

pub(super) fn pagination(p: Option<pb::PageInfo>) -> Pagination {
    let p = p.unwrap_or_default();
    Pagination {
        limit: p.limit,
        offset: p.offset,
        total: p.total,
        has_more: p.has_more,
    }
}

/// This month's consumption by meter, in credits.
#[derive(Serialize, ToSchema)]
#[schema(as = Consumption)]
pub(super) struct ConsumptionJson {
    storage_egress: Num,
    ai_tokens: Num,
    total: Num,
}

/// The organization's credits: `balance` is what may be spent now (never
/// negative), `stored` what its live lots hold, `realtime` stored less open
/// holds.
#[derive(Serialize, ToSchema)]
#[schema(as = Balance)]
pub(super) struct BalanceJson {
    balance: Num,
    stored: Num,
    realtime: Num,
    consumption: ConsumptionJson,
    /// Start of the month `consumption` counts
    #[schema(format = DateTime)]
    period_start: Option<String>,
}

pub async fn balance(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::credits_service_client::CreditsServiceClient::new(gw.channel);
    let b = client
        .get_balance(grpc_request(&headers, pb::GetBalanceRequest {}))
        .await?
        .into_inner();
    let c = b.consumption.unwrap_or_default();
    Ok(envelope::ok(BalanceJson {
        balance: Num::credits(b.balance_micros),
        stored: Num::credits(b.stored_micros),
        realtime: Num::credits(b.realtime_micros),
        consumption: ConsumptionJson {
            storage_egress: Num::credits(c.storage_egress_micros),
            ai_tokens: Num::credits(c.ai_tokens_micros),
            total: Num::credits(c.total_micros),
        },
        period_start: rfc3339(b.period_start),
    }))
}

/// One ledger row: positive amounts add credits, negative ones spend them.
#[derive(Serialize, ToSchema)]
#[schema(as = Transaction)]
pub(super) struct TransactionJson {
    id: String,
    /// The transaction type (the values of the listing's `type` filter)
    #[serde(rename = "type")]
    kind: String,
    amount: Num,
    balance_after: Num,
    description: String,
    #[schema(format = DateTime)]
    created_at: Option<String>,
    /// In the admin listing only
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<String>,
}

fn transaction_json(t: pb::Transaction, with_org: bool) -> TransactionJson {
    TransactionJson {
        id: t.id,
        kind: t.r#type,
        amount: Num::credits(t.amount_micros),
        balance_after: Num::credits(t.balance_after_micros),
        description: t.description,
        created_at: rfc3339(t.created_at),
        org_id: with_org.then_some(t.org_id),
    }
}

pub async fn transactions(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(params): Params,
) -> ApiResult {
    let request = pb::ListTransactionsRequest {
        page: Some(PageQuery::parse(&params)?),
        r#type: TypeFilter::parse(&params)?,
    };
    let mut client = pb::credits_service_client::CreditsServiceClient::new(gw.channel);
    let r = client
        .list_transactions(grpc_request(&headers, request))
        .await?
        .into_inner();
    let rows: Vec<_> = r
        .transactions
        .into_iter()
        .map(|t| transaction_json(t, false))
        .collect();
    Ok(envelope::ok_page(rows, pagination(r.page)))
}

pub async fn admin_transactions(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(params): Params,
) -> ApiResult {
    let request = pb::AdminListTransactionsRequest {
        page: Some(PageQuery::parse(&params)?),
        org_id: OrgFilter::parse(&params),
        r#type: TypeFilter::parse(&params)?,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .list_transactions(grpc_request(&headers, request))
        .await?
        .into_inner();
    let rows: Vec<_> = r
        .transactions
        .into_iter()
        .map(|t| transaction_json(t, true))
        .collect();
    Ok(envelope::ok_page(rows, pagination(r.page)))
}

/// One month's movements in credits (`month` absent in the totals).
#[derive(Serialize, ToSchema)]
#[schema(as = MonthStat)]
pub(super) struct MonthJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    month: Option<String>,
    consumption: Num,
    purchases: Num,
    grants: Num,
    adjustments: Num,
    balance: Num,
}

fn month_json(m: pb::MonthlyStat) -> MonthJson {
    MonthJson {
        month: rfc3339(m.month),
        consumption: Num::credits(m.consumption_micros),
        purchases: Num::credits(m.purchases_micros),
        grants: Num::credits(m.grants_micros),
        adjustments: Num::credits(m.adjustments_micros),
        balance: Num::credits(m.balance_micros),
    }
}

/// Seed 002: `{"success": true, "data": [...], "totals": {...}}`.
#[derive(Serialize, ToSchema)]
#[schema(as = MonthlyStats)]
pub(super) struct MonthlyJson {
    #[schema(schema_with = super::openapi::true_only)]
    success: bool,
    data: Vec<MonthJson>,
    totals: MonthJson,
}

pub async fn monthly(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(params): Params,
) -> ApiResult {
    let request = pb::GetMonthlyStatsRequest {
        months: MonthsQuery {
            months: int_param(&params, "months")?,
        }
        .months,
    };
    let mut client = pb::credits_service_client::CreditsServiceClient::new(gw.channel);
    let r = client
        .get_monthly_stats(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(Json(MonthlyJson {
        success: true,
        data: r.months.into_iter().map(month_json).collect(),
        totals: month_json(r.totals.unwrap_or_default()),
    })
    .into_response())
}

/// One live lot, in whole credits.
#[derive(Serialize, ToSchema)]
#[schema(as = LotBreakdown)]
pub(super) struct BreakdownJson {
    purchase_kind: String,
    allocated_units: i64,
    remaining_units: i64,
    /// Unix seconds; null for a lot that never expires
    expiry_date: Option<i64>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = ActiveSubscription)]
pub(super) struct ActiveSubscriptionJson {
    id: String,
    display_name: String,
    credits: i64,
    /// Unix seconds
    created_at: Option<i64>,
}

/// Seed 003's answer, not in the envelope; credits are whole units.
#[derive(Serialize, ToSchema)]
#[schema(as = CreditInfo)]
pub(super) struct CreditInfoJson {
    credits: i64,
    breakdown: Vec<BreakdownJson>,
    active_subscription: Option<ActiveSubscriptionJson>,
    allow_usage: bool,
}

/// Whole credits, rounded down (seed 003's integer units).
fn whole(micros: i64) -> i64 {
    micros.div_euclid(crate::domain::MICROS_PER_CREDIT)
}

/// Seed 003 answers errors as `{"error": CODE}`; a missing or bad token is
/// `402 INVALID_API_KEY`.
fn info_error(status: Status) -> Response {
    let api = ApiError::from(status);
    let (code, http) = if api.status == StatusCode::UNAUTHORIZED {
        ("INVALID_API_KEY".to_owned(), StatusCode::PAYMENT_REQUIRED)
    } else {
        (api.code, api.status)
    };
    (http, Json(SeedErrorJson { error: code })).into_response()
}

/// Seed 003's error: `{"error": CODE}`.
#[derive(Serialize, ToSchema)]
#[schema(as = SeedError)]
pub(super) struct SeedErrorJson {
    error: String,
}

/// The seed 003 error of a token refused before the call.
pub fn user_credit_info_error(err: Error) -> Response {
    info_error(err.into())
}

pub async fn user_credit_info(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    let mut client = pb::credits_service_client::CreditsServiceClient::new(gw.channel);
    let info = match client
        .get_credit_info(grpc_request(&headers, pb::GetCreditInfoRequest {}))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return info_error(status),
    };
    Json(CreditInfoJson {
        credits: whole(info.credits_micros),
        breakdown: info
            .breakdown
            .into_iter()
            .map(|l| BreakdownJson {
                purchase_kind: l.purchase_kind,
                allocated_units: whole(l.allocated_micros),
                remaining_units: whole(l.remaining_micros),
                expiry_date: l.expires_at.map(|t| t.seconds),
            })
            .collect(),
        active_subscription: info.active_subscription.map(|s| ActiveSubscriptionJson {
            id: s.id,
            display_name: s.display_name,
            credits: s.credits,
            created_at: s.created_at.map(|t| t.seconds),
        }),
        allow_usage: info.allow_usage,
    })
    .into_response()
}

/// A grant (positive `amount`) or debit (negative) by hand. A grant may
/// expire; a retry with the same `idempotency_key` answers the first
/// adjustment again.
#[derive(Deserialize, ToSchema)]
pub struct ManualBody {
    #[schema(min_length = 1, max_length = 255, pattern = r"\S")]
    org_id: String,
    #[schema(schema_with = manual_amount)]
    amount: Box<RawValue>,
    #[schema(min_length = 1, max_length = 1000, pattern = r"\S")]
    reason: String,
    /// Grants only; in the future
    #[serde(default)]
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[serde(default)]
    #[schema(max_length = 255)]
    idempotency_key: Option<String>,
}

/// Credits other than 0, at most 10^12 either way.
fn manual_amount() -> utoipa::openapi::schema::AnyOfBuilder {
    super::openapi::nonzero_credits()
}

/// The adjustment's ledger row and the balance after it.
#[derive(Serialize, ToSchema)]
#[schema(as = ManualAdjustment)]
pub(super) struct ManualJson {
    transaction_id: String,
    balance: Num,
}

/// A JSON number of credits, exactly (no floating point).
pub(super) fn credits_field(field: &str, raw: &RawValue) -> Result<i64, ApiError> {
    let text = raw.get().trim();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(Error::invalid(field, "must be a number of credits").into());
    }
    parse_credits(text).map_err(|e| Error::invalid(field, e).into())
}

pub async fn manual(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ManualBody>,
) -> ApiResult {
    let amount_micros = credits_field("amount", &body.amount)?;
    let expires_at = rfc3339_field("expires_at", body.expires_at.as_deref())?;
    let request = pb::ManualAdjustRequest {
        org_id: body.org_id,
        amount_micros,
        reason: body.reason,
        expires_at,
        idempotency_key: body.idempotency_key,
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .manual_adjust(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(ManualJson {
        transaction_id: r.transaction_id,
        balance: Num::credits(r.balance_micros),
    }))
}

/// An optional RFC 3339 date-time field (empty is absent).
pub(super) fn rfc3339_field(
    field: &str,
    value: Option<&str>,
) -> Result<Option<prost_types::Timestamp>, ApiError> {
    match value.map(str::trim) {
        None => Ok(None),
        Some(s) => {
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| {
                ApiError::from(Error::invalid(field, "must be an RFC 3339 date-time"))
            })?;
            Ok(Some(prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            }))
        }
    }
}
