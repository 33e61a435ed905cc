//! `CheckinService`: Daily check-in.

use tonic::{Request, Response, Status};

use super::not_yet;
use crate::{pb, state::AppState};

pub struct CheckinApi {
    #[expect(dead_code, reason = "read once this service's capability is built")]
    state: AppState,
}

impl CheckinApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::checkin_service_server::CheckinService for CheckinApi {
    async fn checkin(
        &self,
        _request: Request<pb::CheckinRequest>,
    ) -> Result<Response<pb::CheckinResponse>, Status> {
        not_yet!("CheckinService.Checkin")
    }

    async fn get_checkin_status(
        &self,
        _request: Request<pb::GetCheckinStatusRequest>,
    ) -> Result<Response<pb::GetCheckinStatusResponse>, Status> {
        not_yet!("CheckinService.GetCheckinStatus")
    }
}
