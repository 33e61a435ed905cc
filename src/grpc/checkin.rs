//! `CheckinService`: daily check-in (see [`crate::checkin`]).

use tonic::{Request, Response, Status};

use super::convert;
use crate::{auth::caller, checkin, pb, state::AppState};

pub struct CheckinApi {
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
        request: Request<pb::CheckinRequest>,
    ) -> Result<Response<pb::CheckinResponse>, Status> {
        let who = caller(&request)?.clone();
        self.state.require_credits()?;
        let out = checkin::check_in(&self.state, &who.org_id, &who.sub).await?;
        Ok(Response::new(pb::CheckinResponse {
            credits_awarded_micros: out.credits_micros,
            streak: out.streak,
            next_checkin_at: Some(convert::timestamp(out.next_checkin_at)),
            balance_micros: out.balance_micros,
        }))
    }

    async fn get_checkin_status(
        &self,
        request: Request<pb::GetCheckinStatusRequest>,
    ) -> Result<Response<pb::GetCheckinStatusResponse>, Status> {
        let who = caller(&request)?.clone();
        self.state.require_credits()?;
        let s = checkin::status(&self.state, &who.sub).await?;
        Ok(Response::new(pb::GetCheckinStatusResponse {
            enabled: s.config.enabled,
            checked_in_today: s.checked_in_today,
            streak: s.streak,
            next_checkin_at: Some(convert::timestamp(s.next_checkin_at)),
            credits_per_day_micros: s.config.credits_per_day_micros,
            streak_bonus_micros: s.config.streak_bonus_micros,
        }))
    }
}
