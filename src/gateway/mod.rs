//! The REST gateway (CONTRACT §3): every route is a translation to one gRPC
//! call through the generated clients, over an in-process channel in
//! `billing serve` or the network in `billing gateway --upstream`. It holds no
//! business logic: JSON in, gRPC request out, gRPC answer back as JSON, and a
//! gRPC status as the HTTP status of CONTRACT §4.
//!
//! One table ([`routes`]) drives both the axum router and `/openapi.json`;
//! each route names the Rust types its handler decodes and encodes, and the
//! document's schemas are derived from those types (see `openapi`), so the
//! document cannot drift from what is served.

mod admin;
mod checkin;
mod credits;
pub(crate) mod envelope;
mod openapi;
mod payments;
mod whole;

use std::sync::Arc;

use std::collections::HashMap;

use axum::{
    Router,
    extract::{MatchedPath, State},
    http::{HeaderMap, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{MethodRouter, get, post},
};
use serde::Serialize;
use tonic::Request;
use tower::BoxError;
use utoipa::ToSchema;

pub use envelope::{ApiError, ApiResult, JsonBody, Num, Pagination};
pub use openapi::{Access, RouteDoc};

use crate::{
    auth::{Access as AuthAccess, JwtKeys, Role, authorize},
    clock::SharedClock,
    metrics::Metrics,
    pb,
};

/// A gRPC channel to the billing services: in-process or over the network.
pub type GrpcChannel = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    ChannelError,
>;

/// Why a gateway channel could not carry a call (transport level).
///
/// A concrete type rather than `BoxError`: tonic's client bounds then hold
/// for every lifetime, which `async` handlers need to be `Send`.
#[derive(Debug)]
pub struct ChannelError(pub BoxError);

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ChannelError {}

/// Largest accepted request body (webhooks included).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Gateway {
    channel: GrpcChannel,
    metrics: Metrics,
}

/// How the gateway checks tokens before it decodes any input, so that a
/// request is refused in the contract's order: 401, 403, then 400. The gRPC
/// side checks again with the same keys.
#[derive(Clone)]
pub struct GatewayAuth {
    pub keys: JwtKeys,
    pub clock: SharedClock,
}

#[derive(Clone)]
struct RouteAuth {
    auth: GatewayAuth,
    access: Arc<HashMap<(Method, &'static str), Access>>,
}

const USER_ROLES: &[Role] = &[Role::User, Role::Admin];
const ADMIN_ROLES: &[Role] = &[Role::Admin];

async fn authenticate(
    State(route_auth): State<RouteAuth>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(path) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    let roles = match route_auth
        .access
        .get(&(req.method().clone(), path.as_str()))
    {
        None | Some(Access::Public) => return next.run(req).await,
        Some(Access::User) => USER_ROLES,
        Some(Access::Admin) => ADMIN_ROLES,
    };
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let now = route_auth.auth.clock.now().timestamp();
    match authorize(&route_auth.auth.keys, AuthAccess::Roles(roles), header, now) {
        Ok(_) => next.run(req).await,
        Err(e) if path == "/user/credits/info" => credits::user_credit_info_error(e),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A gRPC request carrying the caller's bearer token as metadata.
fn grpc_request<T>(headers: &HeaderMap, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

// ---- built routes -------------------------------------------------------

/// A credit pack on sale; `price` in currency units (`9.99`).
#[derive(Serialize, ToSchema)]
#[schema(as = Pack)]
struct PackJson {
    id: String,
    name: String,
    code: String,
    credits: i64,
    price: Num,
}

async fn list_packs(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::packs_service_client::PacksServiceClient::new(gw.channel);
    let packs = client
        .list_packs(grpc_request(&headers, pb::ListPacksRequest {}))
        .await?
        .into_inner()
        .packs;
    Ok(envelope::ok(
        packs
            .into_iter()
            .map(|p| PackJson {
                id: p.id,
                name: p.name,
                code: p.code,
                credits: p.credits,
                price: Num::money(p.price_cents),
            })
            .collect::<Vec<_>>(),
    ))
}

/// The meters usage is measured in.
fn meters() -> utoipa::openapi::ObjectBuilder {
    openapi::one_of(
        crate::domain::Meter::ALL.map(crate::domain::Meter::as_str),
        false,
    )
}

/// A rate as the public listing shows it; `model` null for the meter's
/// default rate; `credits_per_unit` in credits.
#[derive(Serialize, ToSchema)]
#[schema(as = Rate)]
struct RateJson {
    id: String,
    #[schema(schema_with = meters)]
    meter: String,
    unit: String,
    model: Option<String>,
    credits_per_unit: Num,
    description: String,
}

impl From<pb::Rate> for RateJson {
    fn from(r: pb::Rate) -> Self {
        Self {
            id: r.id,
            meter: r.meter,
            unit: r.unit,
            model: r.model,
            credits_per_unit: Num::credits(r.credits_per_unit_micros),
            description: r.description,
        }
    }
}

async fn list_rates(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::credits_service_client::CreditsServiceClient::new(gw.channel);
    let rates = client
        .list_rates(grpc_request(&headers, pb::ListRatesRequest {}))
        .await?
        .into_inner()
        .rates;
    Ok(envelope::ok(
        rates.into_iter().map(RateJson::from).collect::<Vec<_>>(),
    ))
}

/// A plan as the public listing shows it (seed 004); prices in cents.
#[derive(Serialize, ToSchema)]
#[schema(as = Plan)]
struct PlanJson {
    id: String,
    code: String,
    name: String,
    description: String,
    /// Cents
    price_monthly: i64,
    /// Cents
    price_yearly: i64,
    credits_included: i64,
    features: Vec<String>,
}

impl From<pb::Plan> for PlanJson {
    fn from(p: pb::Plan) -> Self {
        Self {
            id: p.id,
            code: p.code,
            name: p.name,
            description: p.description,
            price_monthly: p.price_monthly_cents,
            price_yearly: p.price_yearly_cents,
            credits_included: p.credits_included,
            features: p.features,
        }
    }
}

async fn list_plans(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::subscriptions_service_client::SubscriptionsServiceClient::new(gw.channel);
    let plans = client
        .list_plans(grpc_request(&headers, pb::ListPlansRequest {}))
        .await?
        .into_inner()
        .plans;
    Ok(envelope::ok(
        plans.into_iter().map(PlanJson::from).collect::<Vec<_>>(),
    ))
}

/// A plan as admins see it: every field, inactive plans included.
#[derive(Serialize, ToSchema)]
#[schema(as = AdminPlan)]
struct AdminPlanJson {
    #[serde(flatten)]
    public: PlanJson,
    tier: i32,
    currency: String,
    active: bool,
    stripe_price_monthly: Option<String>,
    stripe_price_yearly: Option<String>,
    creem_product_id: Option<String>,
}

impl From<pb::Plan> for AdminPlanJson {
    fn from(p: pb::Plan) -> Self {
        let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
        Self {
            tier: p.tier,
            currency: p.currency.clone(),
            active: p.active,
            stripe_price_monthly: none_if_empty(p.stripe_price_monthly.clone()),
            stripe_price_yearly: none_if_empty(p.stripe_price_yearly.clone()),
            creem_product_id: none_if_empty(p.creem_product_id.clone()),
            public: PlanJson::from(p),
        }
    }
}

async fn admin_list_plans(State(gw): State<Gateway>, headers: HeaderMap) -> ApiResult {
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let plans = client
        .list_plans(grpc_request(&headers, pb::AdminListPlansRequest {}))
        .await?
        .into_inner()
        .plans;
    Ok(envelope::ok(
        plans
            .into_iter()
            .map(AdminPlanJson::from)
            .collect::<Vec<_>>(),
    ))
}

// ---- probes, metrics, documents ----------------------------------------

async fn healthz() -> Response {
    envelope::ok(serde_json::json!({ "status": "ok" }))
}

/// Ready when the gRPC side reports SERVING (it does once the database
/// answers and migrations are applied).
async fn readyz(State(gw): State<Gateway>) -> Response {
    let mut client = tonic_health::pb::health_client::HealthClient::new(gw.channel);
    let answer = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    match answer.map(|r| r.into_inner().status()) {
        Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => {
            envelope::ok(serde_json::json!({ "status": "ready" }))
        }
        _ => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY", "not ready").into_response()
        }
    }
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render().await,
    )
        .into_response()
}

async fn not_found(method: Method, uri: http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Every documented route with its handler.
pub fn routes() -> Vec<(RouteDoc, MethodRouter<Gateway>)> {
    use Access::{Admin, Public, User};
    let doc = RouteDoc::new;
    vec![
        (
            doc(
                "GET",
                "/credits/balance",
                "Credit balance (stored, held, spendable) and this month's consumption",
                User,
                "Credits",
            )
            .data::<credits::BalanceJson>(),
            get(credits::balance),
        ),
        (
            doc(
                "GET",
                "/credits/transactions",
                "Ledger rows, newest first",
                User,
                "Credits",
            )
            .query::<credits::PageQuery>()
            .query::<credits::TypeFilter>()
            .page::<credits::TransactionJson>(),
            get(credits::transactions),
        ),
        (
            doc(
                "GET",
                "/credits/stats/monthly",
                "Monthly consumption, purchases, grants and net change",
                User,
                "Credits",
            )
            .query::<credits::MonthsQuery>()
            .bare::<credits::MonthlyJson>(),
            get(credits::monthly),
        ),
        (
            doc(
                "GET",
                "/credits/packs",
                "Active credit packs",
                Public,
                "Credits",
            )
            .list::<PackJson>(),
            get(list_packs),
        ),
        (
            doc("GET", "/credits/rates", "Usage rates", Public, "Credits").list::<RateJson>(),
            get(list_rates),
        ),
        (
            doc(
                "POST",
                "/credits/packs/buy",
                "Start a checkout for a credit pack",
                User,
                "Credits",
            )
            .body::<payments::BuyPackBody>()
            .data::<payments::BuyPackJson>()
            .errors(&[
                (403, "SUBSCRIPTION_REQUIRED"),
                (404, "PACK_NOT_FOUND"),
                (409, "PACK_LIMIT_REACHED"),
                (
                    429,
                    "PURCHASE_COOLDOWN (with retry_after, cooldown_seconds)",
                ),
            ]),
            post(payments::buy_pack),
        ),
        (
            doc(
                "GET",
                "/user/credits/info",
                "Credits with per-lot breakdown and active subscription (un-enveloped)",
                User,
                "Credits",
            )
            .seed_errors()
            .bare::<credits::CreditInfoJson>(),
            get(credits::user_credit_info),
        ),
        (
            doc(
                "GET",
                "/orders",
                "The organization's orders, newest first",
                User,
                "Orders",
            )
            .query::<credits::PageQuery>()
            .page::<payments::OrderJson>(),
            get(payments::list_orders),
        ),
        (
            doc("GET", "/orders/{id}", "One order", User, "Orders")
                .data::<payments::OrderJson>()
                .errors(&[(404, "ORDER_NOT_FOUND")]),
            get(payments::get_order),
        ),
        (
            doc(
                "GET",
                "/subscription/plans",
                "Active subscription plans",
                Public,
                "Subscriptions",
            )
            .list::<PlanJson>(),
            get(list_plans),
        ),
        (
            doc(
                "POST",
                "/subscription/portal",
                "A billing-portal session URL",
                User,
                "Subscriptions",
            )
            .body::<payments::PortalBody>()
            .data::<payments::PortalJson>(),
            post(payments::portal),
        ),
        (
            doc("POST", "/checkin", "Daily check-in", User, "Check-in")
                .data::<checkin::CheckinJson>()
                .errors(&[
                    (409, "ALREADY_CHECKED_IN"),
                    (429, "RESOURCE_EXHAUSTED: the ledger is overloaded; retry"),
                ]),
            post(checkin::checkin),
        ),
        (
            doc(
                "GET",
                "/checkin/status",
                "Whether the caller has checked in today, and the streak",
                User,
                "Check-in",
            )
            .data::<checkin::StatusJson>(),
            get(checkin::status),
        ),
        (
            doc(
                "POST",
                "/payment/create-session",
                "Create a checkout session for a plan or a pack",
                User,
                "Payment",
            )
            .body::<payments::CreateSessionBody>()
            .data::<payments::SessionJson>()
            .errors(&[
                (403, "SUBSCRIPTION_REQUIRED"),
                (404, "PLAN_NOT_FOUND, PACK_NOT_FOUND"),
                (409, "PACK_LIMIT_REACHED"),
                (429, "PURCHASE_COOLDOWN"),
            ]),
            post(payments::create_session),
        ),
        (
            doc(
                "POST",
                "/payment/webhook/stripe",
                "Stripe webhook (signed with Stripe-Signature)",
                Public,
                "Payment",
            )
            .raw_body()
            .data::<payments::ReceivedJson>(),
            post(payments::stripe_webhook),
        ),
        (
            doc(
                "POST",
                "/payment/webhook/creem",
                "Creem webhook (signed with creem-signature)",
                Public,
                "Payment",
            )
            .raw_body()
            .data::<payments::ReceivedJson>(),
            post(payments::creem_webhook),
        ),
        (
            doc(
                "GET",
                "/admin/billing/plans",
                "Every plan, inactive included",
                Admin,
                "Admin",
            )
            .list::<AdminPlanJson>(),
            get(admin_list_plans),
        ),
        (
            doc(
                "POST",
                "/admin/billing/plans",
                "Create a plan",
                Admin,
                "Admin",
            )
            .body_variant::<admin::PlanBody>("PlanCreateBody", &["code", "name"], &[])
            .data::<AdminPlanJson>()
            .errors(&[(409, "PLAN_CODE_TAKEN")]),
            post(admin::create_plan),
        ),
        (
            doc(
                "PUT",
                "/admin/billing/plans/{id}",
                "Update a plan",
                Admin,
                "Admin",
            )
            .body::<admin::PlanBody>()
            .data::<AdminPlanJson>()
            .errors(&[(404, "PLAN_NOT_FOUND"), (409, "PLAN_CODE_TAKEN")]),
            axum::routing::put(admin::update_plan),
        ),
        (
            doc(
                "GET",
                "/admin/billing/packs",
                "Every credit pack, inactive included",
                Admin,
                "Admin",
            )
            .list::<admin::AdminPackJson>(),
            get(admin::list_packs),
        ),
        (
            doc(
                "POST",
                "/admin/billing/packs",
                "Create a credit pack",
                Admin,
                "Admin",
            )
            .body_variant::<admin::PackBody>("PackCreateBody", &["code", "name", "credits"], &[])
            .data::<admin::AdminPackJson>()
            .errors(&[(409, "PACK_CODE_TAKEN")]),
            post(admin::create_pack),
        ),
        (
            doc(
                "PUT",
                "/admin/billing/packs/{id}",
                "Update a credit pack",
                Admin,
                "Admin",
            )
            .body::<admin::PackBody>()
            .data::<admin::AdminPackJson>()
            .errors(&[(404, "PACK_NOT_FOUND"), (409, "PACK_CODE_TAKEN")]),
            axum::routing::put(admin::update_pack),
        ),
        (
            doc(
                "GET",
                "/admin/billing/rates",
                "Every usage rate, switched-off ones included",
                Admin,
                "Admin",
            )
            .list::<admin::AdminRateJson>(),
            get(admin::list_rates),
        ),
        (
            doc(
                "POST",
                "/admin/billing/rates",
                "Create a usage rate (no model: the meter's default)",
                Admin,
                "Admin",
            )
            .body_variant::<admin::RateBody>("RateCreateBody", &["meter", "credits_per_unit"], &[])
            .data::<admin::AdminRateJson>()
            .errors(&[(409, "RATE_TAKEN")]),
            post(admin::create_rate),
        ),
        (
            doc(
                "PUT",
                "/admin/billing/rates/{id}",
                "Reprice, describe or switch off a usage rate",
                Admin,
                "Admin",
            )
            .body_variant::<admin::RateBody>("RateUpdateBody", &[], &["meter", "model"])
            .data::<admin::AdminRateJson>()
            .errors(&[
                (404, "RATE_NOT_FOUND"),
                (409, "RATE_TAKEN, DEFAULT_RATE_REQUIRED"),
            ]),
            axum::routing::put(admin::update_rate),
        ),
        (
            doc(
                "DELETE",
                "/admin/billing/rates/{id}",
                "Remove a per-model rate (a meter's default stays)",
                Admin,
                "Admin",
            )
            .data::<admin::AdminRateJson>()
            .errors(&[(404, "RATE_NOT_FOUND"), (409, "DEFAULT_RATE_REQUIRED")]),
            axum::routing::delete(admin::delete_rate),
        ),
        (
            doc(
                "GET",
                "/admin/billing/coupons",
                "Coupons with their redemption counts",
                Admin,
                "Admin",
            )
            .list::<admin::CouponJson>(),
            get(admin::list_coupons),
        ),
        (
            doc(
                "POST",
                "/admin/billing/coupons",
                "Create a coupon",
                Admin,
                "Admin",
            )
            .body::<admin::CouponBody>()
            .data::<admin::CouponJson>()
            .errors(&[(409, "COUPON_CODE_TAKEN")]),
            post(admin::create_coupon),
        ),
        (
            doc(
                "PUT",
                "/admin/billing/coupons/{id}",
                "Switch a coupon on or off, change its limit or expiry",
                Admin,
                "Admin",
            )
            .body::<admin::CouponUpdateBody>()
            .data::<admin::CouponJson>()
            .errors(&[(404, "COUPON_NOT_FOUND")]),
            axum::routing::put(admin::update_coupon),
        ),
        (
            doc(
                "GET",
                "/admin/credits/transactions",
                "Ledger rows of any organization",
                Admin,
                "Admin",
            )
            .query::<credits::PageQuery>()
            .query::<credits::OrgFilter>()
            .query::<credits::TypeFilter>()
            .page::<credits::TransactionJson>(),
            get(credits::admin_transactions),
        ),
        (
            doc(
                "POST",
                "/admin/credits/manual",
                "Grant or debit credits by hand",
                Admin,
                "Admin",
            )
            .body::<credits::ManualBody>()
            .data::<credits::ManualJson>()
            .errors(&[
                (409, "INSUFFICIENT_CREDITS, IDEMPOTENCY_KEY_REUSED"),
                (429, "RESOURCE_EXHAUSTED: the ledger is overloaded; retry"),
            ]),
            post(credits::manual),
        ),
        (
            doc(
                "GET",
                "/admin/checkin/config",
                "The check-in configuration",
                Admin,
                "Admin",
            )
            .data::<checkin::ConfigJson>(),
            get(checkin::get_config),
        ),
        (
            doc(
                "PUT",
                "/admin/checkin/config",
                "Change the check-in configuration",
                Admin,
                "Admin",
            )
            .body::<checkin::ConfigBody>()
            .data::<checkin::ConfigJson>(),
            axum::routing::put(checkin::put_config),
        ),
        (
            doc(
                "GET",
                "/admin/audit",
                "The audit log of admin writes, newest first",
                Admin,
                "Admin",
            )
            .query::<credits::PageQuery>()
            .query::<credits::OrgFilter>()
            .query::<admin::ActionFilter>()
            .page::<admin::AuditJson>(),
            get(admin::audit),
        ),
        (
            doc("GET", "/healthz", "Liveness", Public, "Operations").operational(),
            get(healthz),
        ),
        (
            doc(
                "GET",
                "/readyz",
                "Readiness: the database answers",
                Public,
                "Operations",
            )
            .operational()
            .errors(&[(503, "NOT_READY: the database does not answer yet")]),
            get(readyz),
        ),
        (
            doc(
                "GET",
                "/metrics",
                "Prometheus metrics",
                Public,
                "Operations",
            )
            .operational(),
            get(metrics),
        ),
        (
            doc(
                "GET",
                "/openapi.json",
                "This document",
                Public,
                "Operations",
            )
            .operational(),
            get(openapi_json),
        ),
    ]
}

/// The document, built and encoded once: it depends on nothing but the
/// code.
static OPENAPI: std::sync::LazyLock<bytes::Bytes> = std::sync::LazyLock::new(|| {
    let docs: Vec<RouteDoc> = routes().into_iter().map(|(doc, _)| doc).collect();
    // Encoding a document of strings and numbers cannot fail.
    serde_json::to_vec(&openapi::document(&docs))
        .unwrap_or_default()
        .into()
});

async fn openapi_json() -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        OPENAPI.clone(),
    )
        .into_response()
}

/// Swagger UI at `/docs` (assets inside the binary), showing
/// `/openapi.json`.
fn docs_ui() -> Router<Gateway> {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
        .into()
}

/// The REST router over `channel`.
pub fn router(channel: GrpcChannel, auth: GatewayAuth, metrics: Metrics) -> Router {
    let mut router: Router<Gateway> = Router::new();
    let mut access = HashMap::new();
    for (doc, handler) in routes() {
        if let Ok(method) = doc.method.parse::<Method>() {
            access.insert((method, doc.path), doc.access);
        }
        router = router.route(doc.path, handler);
    }
    let route_auth = RouteAuth {
        auth,
        access: Arc::new(access),
    };
    let state = Gateway { channel, metrics };
    router
        .route_layer(axum::middleware::from_fn_with_state(
            route_auth,
            authenticate,
        ))
        // Public like the document it shows; added after the route layer,
        // which only knows the documented routes.
        .merge(docs_ui())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
