//! `PacksService`: Credit packs: the public listing and purchases.

use tonic::{Request, Response, Status};

use super::convert;
use super::not_yet;
use crate::{catalog, pb, state::AppState};

pub struct PacksApi {
    state: AppState,
}

impl PacksApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::packs_service_server::PacksService for PacksApi {
    async fn list_packs(
        &self,
        _request: Request<pb::ListPacksRequest>,
    ) -> Result<Response<pb::ListPacksResponse>, Status> {
        let packs = catalog::list_packs(&self.state.db).await?;
        Ok(Response::new(pb::ListPacksResponse {
            packs: packs.into_iter().map(convert::pack).collect(),
        }))
    }

    async fn buy_pack(
        &self,
        _request: Request<pb::BuyPackRequest>,
    ) -> Result<Response<pb::BuyPackResponse>, Status> {
        not_yet!("PacksService.BuyPack")
    }
}
