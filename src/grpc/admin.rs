//! `AdminService`: Operator endpoints (role `admin`).

use tonic::{Request, Response, Status};

use super::convert;
use super::not_yet;
use crate::{catalog, pb, state::AppState};

pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_plans(
        &self,
        _request: Request<pb::AdminListPlansRequest>,
    ) -> Result<Response<pb::AdminListPlansResponse>, Status> {
        let plans = catalog::list_plans(&self.state.db, true).await?;
        Ok(Response::new(pb::AdminListPlansResponse {
            plans: plans.into_iter().map(convert::plan).collect(),
        }))
    }

    async fn create_plan(
        &self,
        _request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        not_yet!("AdminService.CreatePlan")
    }

    async fn update_plan(
        &self,
        _request: Request<pb::UpdatePlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        not_yet!("AdminService.UpdatePlan")
    }

    async fn list_coupons(
        &self,
        _request: Request<pb::ListCouponsRequest>,
    ) -> Result<Response<pb::ListCouponsResponse>, Status> {
        not_yet!("AdminService.ListCoupons")
    }

    async fn create_coupon(
        &self,
        _request: Request<pb::CreateCouponRequest>,
    ) -> Result<Response<pb::CouponResponse>, Status> {
        not_yet!("AdminService.CreateCoupon")
    }

    async fn list_transactions(
        &self,
        _request: Request<pb::AdminListTransactionsRequest>,
    ) -> Result<Response<pb::AdminListTransactionsResponse>, Status> {
        not_yet!("AdminService.ListTransactions")
    }

    async fn manual_adjust(
        &self,
        _request: Request<pb::ManualAdjustRequest>,
    ) -> Result<Response<pb::ManualAdjustResponse>, Status> {
        not_yet!("AdminService.ManualAdjust")
    }

    async fn get_checkin_config(
        &self,
        _request: Request<pb::GetCheckinConfigRequest>,
    ) -> Result<Response<pb::CheckinConfig>, Status> {
        not_yet!("AdminService.GetCheckinConfig")
    }

    async fn update_checkin_config(
        &self,
        _request: Request<pb::CheckinConfig>,
    ) -> Result<Response<pb::CheckinConfig>, Status> {
        not_yet!("AdminService.UpdateCheckinConfig")
    }
}
