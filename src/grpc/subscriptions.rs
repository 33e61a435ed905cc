//! `SubscriptionsService`: Plans (public) and the caller's subscription.

use tonic::{Request, Response, Status};

use super::{convert, input};
use crate::{
    auth::caller,
    catalog::{self, effective_plan},
    error::Error,
    payments::purchase,
    pb,
    state::AppState,
};

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
        let plans = catalog::list_plans(&self.state.read_db, false).await?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.into_iter().map(convert::plan).collect(),
        }))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::GetSubscriptionResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        let org_id = self.state.ledger.org_id(&org).await?;
        let (sub, plan) = effective_plan(&self.state.db, org_id, self.state.clock.now()).await?;
        let plan = plan.ok_or_else(|| Error::internal("the free plan is missing"))?;
        let subscription = sub.map(|s| pb::Subscription {
            id: s.id,
            plan_id: s.plan_id,
            plan_code: plan.code.clone(),
            status: s.status,
            billing_period: s.billing_period,
            channel: s.channel,
            current_period_start: s.current_period_start.map(convert::timestamp),
            current_period_end: s.current_period_end.map(convert::timestamp),
            cancel_at_period_end: s.cancel_at_period_end,
            created_at: Some(convert::timestamp(s.created_at)),
        });
        Ok(Response::new(pb::GetSubscriptionResponse {
            subscription,
            plan: Some(convert::plan(plan)),
        }))
    }

    async fn create_portal_session(
        &self,
        request: Request<pb::CreatePortalSessionRequest>,
    ) -> Result<Response<pb::CreatePortalSessionResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        let return_url = input::optional_url("return_url", Some(&request.get_ref().return_url))?;
        let url = purchase::portal(&self.state, &org, return_url.as_deref()).await?;
        Ok(Response::new(pb::CreatePortalSessionResponse { url }))
    }
}
