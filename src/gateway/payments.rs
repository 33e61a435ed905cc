//! REST ⇄ gRPC for orders and payments. An order's `amount` is in currency
//! units (`19.99`), like a pack's `price`.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::HeaderMap,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiResult, Gateway, JsonBody, Num, credits, envelope, grpc_request};
use crate::{
    payments::purchase::{Channel, Period},
    pb,
};

/// An order: a pack bought or a subscription period paid; `amount` in
/// currency units (`19.99`).
#[derive(Serialize, ToSchema)]
#[schema(as = Order)]
pub(super) struct OrderJson {
    id: String,
    /// `pack` or `subscription`
    kind: String,
    status: String,
    pack_id: Option<String>,
    plan_id: Option<String>,
    amount: Num,
    currency: String,
    #[schema(schema_with = channels)]
    channel: String,
    #[schema(format = DateTime)]
    created_at: Option<String>,
    #[schema(format = DateTime)]
    paid_at: Option<String>,
}

fn order_json(o: pb::Order) -> OrderJson {
    OrderJson {
        id: o.id,
        kind: o.kind,
        status: o.status,
        pack_id: o.pack_id,
        plan_id: o.plan_id,
        amount: Num::money(o.amount_cents),
        currency: o.currency,
        channel: o.channel,
        created_at: credits::rfc3339(o.created_at),
        paid_at: credits::rfc3339(o.paid_at),
    }
}

pub async fn list_orders(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult {
    let request = pb::ListOrdersRequest {
        page: Some(credits::PageQuery::parse(&params)?),
    };
    let mut client = pb::payment_service_client::PaymentServiceClient::new(gw.channel);
    let r = client
        .list_orders(grpc_request(&headers, request))
        .await?
        .into_inner();
    let rows: Vec<_> = r.orders.into_iter().map(order_json).collect();
    Ok(envelope::ok_page(rows, credits::pagination(r.page)))
}

pub async fn get_order(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let mut client = pb::payment_service_client::PaymentServiceClient::new(gw.channel);
    let r = client
        .get_order(grpc_request(&headers, pb::GetOrderRequest { id }))
        .await?
        .into_inner();
    Ok(envelope::ok(r.order.map(order_json)))
}

/// A pack to buy; the channel is `stripe` when not given.
#[derive(Deserialize, ToSchema)]
pub struct BuyPackBody {
    #[serde(rename = "packId")]
    #[schema(min_length = 1, max_length = 64, pattern = r"\S")]
    pack_id: String,
    #[serde(default)]
    #[schema(schema_with = maybe_url)]
    success_url: Option<String>,
    #[serde(default)]
    #[schema(schema_with = maybe_url)]
    cancel_url: Option<String>,
    #[serde(default)]
    #[schema(max_length = 64)]
    coupon_code: Option<String>,
    #[serde(default)]
    #[schema(schema_with = maybe_channel)]
    channel: Option<String>,
}

fn url() -> utoipa::openapi::ObjectBuilder {
    super::openapi::url(false)
}

fn maybe_url() -> utoipa::openapi::ObjectBuilder {
    super::openapi::url(true)
}

/// The payment providers.
fn channels() -> utoipa::openapi::ObjectBuilder {
    super::openapi::one_of(Channel::ALL.map(Channel::as_str), false)
}

fn maybe_channel() -> utoipa::openapi::ObjectBuilder {
    super::openapi::one_of(Channel::ALL.map(Channel::as_str), true)
}

/// The order created and where to send the buyer to pay.
#[derive(Serialize, ToSchema)]
#[schema(as = BuyPackResult)]
pub(super) struct BuyPackJson {
    order_id: String,
    session_id: String,
    checkout_url: String,
}

pub async fn buy_pack(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<BuyPackBody>,
) -> ApiResult {
    let request = pb::BuyPackRequest {
        pack_id: body.pack_id,
        success_url: body.success_url,
        cancel_url: body.cancel_url,
        coupon_code: body.coupon_code,
        channel: body.channel,
    };
    let mut client = pb::packs_service_client::PacksServiceClient::new(gw.channel);
    let r = client
        .buy_pack(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(BuyPackJson {
        order_id: r.order_id,
        session_id: r.session_id,
        checkout_url: r.checkout_url,
    }))
}

#[derive(Serialize, ToSchema)]
#[schema(as = WebhookReceived)]
pub(super) struct ReceivedJson {
    received: bool,
}

#[derive(Clone, Copy)]
enum Provider {
    Stripe,
    Creem,
}

/// A provider webhook: the raw body and the signature header, passed on
/// untouched (the signature covers the exact bytes).
async fn webhook(gw: Gateway, headers: HeaderMap, body: Bytes, provider: Provider) -> ApiResult {
    let header = match provider {
        Provider::Stripe => "stripe-signature",
        Provider::Creem => "creem-signature",
    };
    let signature = headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let request = pb::WebhookRequest {
        payload: body.to_vec(),
        signature,
    };
    let mut client = pb::payment_service_client::PaymentServiceClient::new(gw.channel);
    let request = grpc_request(&headers, request);
    let r = match provider {
        Provider::Stripe => client.handle_stripe_webhook(request).await?,
        Provider::Creem => client.handle_creem_webhook(request).await?,
    }
    .into_inner();
    Ok(envelope::ok(ReceivedJson {
        received: r.received,
    }))
}

pub async fn stripe_webhook(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    webhook(gw, headers, body, Provider::Stripe).await
}

pub async fn creem_webhook(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    webhook(gw, headers, body, Provider::Creem).await
}

#[derive(Deserialize, ToSchema)]
pub struct PortalBody {
    #[serde(default)]
    #[schema(required = true, schema_with = url)]
    return_url: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = PortalSession)]
pub(super) struct PortalJson {
    url: String,
}

pub async fn portal(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PortalBody>,
) -> ApiResult {
    let request = pb::CreatePortalSessionRequest {
        return_url: body.return_url,
    };
    let mut client = pb::subscriptions_service_client::SubscriptionsServiceClient::new(gw.channel);
    let r = client
        .create_portal_session(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(PortalJson { url: r.url }))
}

/// A checkout: a plan (`type` `subscription`, with `plan_id`) or a pack
/// (`type` `pack`, with `pack_id`).
#[derive(Deserialize, ToSchema)]
pub struct CreateSessionBody {
    #[serde(default)]
    #[schema(required = true, schema_with = channels)]
    channel: String,
    #[serde(default, rename = "type")]
    #[schema(required = true, schema_with = session_types)]
    kind: String,
    #[serde(default)]
    #[schema(max_length = 64)]
    plan_id: Option<String>,
    #[serde(default)]
    #[schema(max_length = 64)]
    pack_id: Option<String>,
    /// `monthly` when not given
    #[serde(default)]
    #[schema(schema_with = maybe_period)]
    billing_period: Option<String>,
    #[serde(default)]
    #[schema(required = true, schema_with = url)]
    success_url: String,
    #[serde(default)]
    #[schema(required = true, schema_with = url)]
    cancel_url: String,
    #[serde(default)]
    #[schema(max_length = 64)]
    coupon_code: Option<String>,
}

fn session_types() -> utoipa::openapi::ObjectBuilder {
    super::openapi::one_of(["subscription", "pack"], false)
}

fn maybe_period() -> utoipa::openapi::ObjectBuilder {
    super::openapi::one_of(Period::ALL.map(Period::as_str), true)
}

/// The order created and the provider's checkout URL.
#[derive(Serialize, ToSchema)]
#[schema(as = CheckoutSession)]
pub(super) struct SessionJson {
    order_id: String,
    session_id: String,
    url: String,
}

pub async fn create_session(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateSessionBody>,
) -> ApiResult {
    let request = pb::CreateSessionRequest {
        channel: body.channel,
        r#type: body.kind,
        plan_id: body.plan_id,
        pack_id: body.pack_id,
        billing_period: body.billing_period,
        success_url: body.success_url,
        cancel_url: body.cancel_url,
        coupon_code: body.coupon_code,
    };
    let mut client = pb::payment_service_client::PaymentServiceClient::new(gw.channel);
    let r = client
        .create_session(grpc_request(&headers, request))
        .await?
        .into_inner();
    Ok(envelope::ok(SessionJson {
        order_id: r.order_id,
        session_id: r.session_id,
        url: r.url,
    }))
}
