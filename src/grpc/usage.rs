//! `UsageService`: The metering hot path (role `service`).

use tonic::{Request, Response, Status};

use super::not_yet;
use crate::{pb, state::AppState};

pub struct UsageApi {
    #[expect(dead_code, reason = "read once this service's capability is built")]
    state: AppState,
}

impl UsageApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::usage_service_server::UsageService for UsageApi {
    async fn consume(
        &self,
        _request: Request<pb::ConsumeRequest>,
    ) -> Result<Response<pb::ConsumeResponse>, Status> {
        not_yet!("UsageService.Consume")
    }

    async fn reserve(
        &self,
        _request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        not_yet!("UsageService.Reserve")
    }

    async fn commit(
        &self,
        _request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        not_yet!("UsageService.Commit")
    }

    async fn release(
        &self,
        _request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        not_yet!("UsageService.Release")
    }

    async fn check_allowance(
        &self,
        _request: Request<pb::CheckAllowanceRequest>,
    ) -> Result<Response<pb::CheckAllowanceResponse>, Status> {
        not_yet!("UsageService.CheckAllowance")
    }
}
