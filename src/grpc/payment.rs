//! `PaymentService`: Checkout sessions, orders and provider webhooks.

use tonic::{Request, Response, Status};

use super::{convert, input, not_yet};
use crate::{
    auth::caller,
    error::Error,
    payments::{orders, webhooks},
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
        _request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        not_yet!("PaymentService.CreateSession")
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        let (limit, offset) = input::page(request.get_ref().page.as_ref())?;
        let (rows, total) = match self.state.ledger.org_id(&org).await? {
            Some(org_id) => orders::list(&self.state.db, org_id, limit, offset).await?,
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
        let order = orders::get(&self.state.db, org_id, &id).await?;
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
        _request: Request<pb::WebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        not_yet!("PaymentService.HandleCreemWebhook")
    }
}
