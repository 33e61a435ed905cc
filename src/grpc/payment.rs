//! `PaymentService`: Checkout sessions, orders and provider webhooks.

use tonic::{Request, Response, Status};

use super::{convert, input};
use crate::{
    auth::caller,
    coupons::redeem,
    error::Error,
    payments::{
        orders,
        purchase::{self, BuyPack, Channel, Period, Subscribe},
        webhooks,
    },
    pb,
    state::AppState,
};

pub struct PaymentApi {
    state: AppState,
}

impl PaymentApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::payment_service_server::PaymentService for PaymentApi {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        self.state.require_credits()?;
        let r = request.into_inner();
        let channel = match r.channel.trim() {
            "" => return Err(Error::invalid("channel", "is required (stripe, creem)").into()),
            given => Channel::parse("channel", Some(given))?,
        };
        let success_url = input::optional_url("success_url", Some(&r.success_url))?
            .ok_or_else(|| Error::invalid("success_url", "is required"))?;
        let cancel_url = input::optional_url("cancel_url", Some(&r.cancel_url))?
            .ok_or_else(|| Error::invalid("cancel_url", "is required"))?;
        let period = Period::parse("billing_period", r.billing_period.as_deref())?;
        let coupon = redeem::code("coupon_code", r.coupon_code.as_deref())?;
        match r.r#type.trim() {
            "pack" => {
                let pack_id = input::required("pack_id", r.pack_id.as_deref().unwrap_or(""), 64)?;
                let checkout = purchase::buy_pack(
                    &self.state,
                    BuyPack {
                        org,
                        pack_id,
                        channel,
                        success_url: Some(success_url),
                        cancel_url: Some(cancel_url),
                        coupon,
                    },
                )
                .await?;
                Ok(Response::new(pb::CreateSessionResponse {
                    order_id: checkout.order_id,
                    session_id: checkout.session_id,
                    url: checkout.url,
                }))
            }
            "subscription" => {
                let plan_id = input::required("plan_id", r.plan_id.as_deref().unwrap_or(""), 64)?;
                let checkout = purchase::subscribe(
                    &self.state,
                    Subscribe {
                        org,
                        plan_id,
                        period,
                        channel,
                        success_url: Some(success_url),
                        cancel_url: Some(cancel_url),
                        coupon,
                    },
                )
                .await?;
                Ok(Response::new(pb::CreateSessionResponse {
                    order_id: checkout.order_id,
                    session_id: checkout.session_id,
                    url: checkout.url,
                }))
            }
            "" => Err(Error::invalid("type", "is required (subscription, pack)").into()),
            other => Err(Error::invalid(
                "type",
                format!("unknown type `{other}` (subscription, pack)"),
            )
            .into()),
        }
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        let (limit, offset) = input::page(request.get_ref().page.as_ref())?;
        let (rows, total) = match self.state.ledger.org_id(&org).await? {
            Some(org_id) => orders::list(&self.state.read_db, org_id, limit, offset).await?,
            None => (Vec::new(), 0),
        };
        let page = convert::page_info(limit, offset, rows.len(), total);
        Ok(Response::new(pb::ListOrdersResponse {
            orders: rows.into_iter().map(|o| convert::order(o, &org)).collect(),
            page: Some(page),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        let id = input::required("id", &request.get_ref().id, 64)?;
        let org_id = self
            .state
            .ledger
            .org_id(&org)
            .await?
            .ok_or(Error::OrderNotFound)?;
        let order = orders::get(&self.state.read_db, org_id, &id).await?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(convert::order(order, &org)),
        }))
    }

    async fn handle_stripe_webhook(
        &self,
        request: Request<pb::WebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        let r = request.into_inner();
        webhooks::stripe(&self.state, &r.payload, &r.signature).await?;
        Ok(Response::new(pb::WebhookResponse { received: true }))
    }

    async fn handle_creem_webhook(
        &self,
        request: Request<pb::WebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        let r = request.into_inner();
        webhooks::creem(&self.state, &r.payload, &r.signature).await?;
        Ok(Response::new(pb::WebhookResponse { received: true }))
    }
}
