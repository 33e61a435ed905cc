//! `PacksService`: Credit packs: the public listing and purchases.

use tonic::{Request, Response, Status};

use super::{convert, input};
use crate::{
    auth::caller,
    catalog,
    coupons::redeem,
    payments::purchase::{self, BuyPack, Channel},
    pb,
    state::AppState,
};

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
        let packs = catalog::list_packs(&self.state.read_db).await?;
        Ok(Response::new(pb::ListPacksResponse {
            packs: packs.into_iter().map(convert::pack).collect(),
        }))
    }

    async fn buy_pack(
        &self,
        request: Request<pb::BuyPackRequest>,
    ) -> Result<Response<pb::BuyPackResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        self.state.require_credits()?;
        let r = request.into_inner();
        let pack_id = input::required("packId", &r.pack_id, 64)?;
        let success_url = input::optional_url("success_url", r.success_url.as_deref())?;
        let cancel_url = input::optional_url("cancel_url", r.cancel_url.as_deref())?;
        let channel = Channel::parse("channel", r.channel.as_deref())?;
        let coupon = redeem::code("coupon_code", r.coupon_code.as_deref())?;
        let checkout = purchase::buy_pack(
            &self.state,
            BuyPack {
                org,
                pack_id,
                channel,
                success_url,
                cancel_url,
                coupon,
            },
        )
        .await?;
        Ok(Response::new(pb::BuyPackResponse {
            order_id: checkout.order_id,
            session_id: checkout.session_id,
            checkout_url: checkout.url,
        }))
    }
}
