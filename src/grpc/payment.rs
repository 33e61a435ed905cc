//! `PaymentService`: Checkout sessions, orders and provider webhooks.

use tonic::{Request, Response, Status};

use super::not_yet;
use crate::{pb, state::AppState};

pub struct PaymentApi {
    #[expect(dead_code, reason = "read once this service's capability is built")]
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
        _request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        not_yet!("PaymentService.ListOrders")
    }

    async fn get_order(
        &self,
        _request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        not_yet!("PaymentService.GetOrder")
    }

    async fn handle_stripe_webhook(
        &self,
        _request: Request<pb::WebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        not_yet!("PaymentService.HandleStripeWebhook")
    }

    async fn handle_creem_webhook(
        &self,
        _request: Request<pb::WebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        not_yet!("PaymentService.HandleCreemWebhook")
    }
}
