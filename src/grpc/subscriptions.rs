//! `SubscriptionsService`: Plans (public) and the caller's subscription.

use tonic::{Request, Response, Status};

use super::convert;
use super::not_yet;
use crate::{catalog, pb, state::AppState};

pub struct SubscriptionsApi {
    state: AppState,
}

impl SubscriptionsApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::subscriptions_service_server::SubscriptionsService for SubscriptionsApi {
    async fn list_plans(
        &self,
        _request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let plans = catalog::list_plans(&self.state.db, false).await?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.into_iter().map(convert::plan).collect(),
        }))
    }

    async fn get_subscription(
        &self,
        _request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::GetSubscriptionResponse>, Status> {
        not_yet!("SubscriptionsService.GetSubscription")
    }

    async fn create_portal_session(
        &self,
        _request: Request<pb::CreatePortalSessionRequest>,
    ) -> Result<Response<pb::CreatePortalSessionResponse>, Status> {
        not_yet!("SubscriptionsService.CreatePortalSession")
    }
}
