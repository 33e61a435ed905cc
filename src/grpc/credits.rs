//! `CreditsService`: Balance, ledger and statistics reads; `ListRates` is public.

use tonic::{Request, Response, Status};

use super::convert;
use super::not_yet;
use crate::{catalog, pb, state::AppState};

pub struct CreditsApi {
    state: AppState,
}

impl CreditsApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::credits_service_server::CreditsService for CreditsApi {
    async fn get_balance(
        &self,
        _request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        not_yet!("CreditsService.GetBalance")
    }

    async fn list_transactions(
        &self,
        _request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        not_yet!("CreditsService.ListTransactions")
    }

    async fn get_monthly_stats(
        &self,
        _request: Request<pb::GetMonthlyStatsRequest>,
    ) -> Result<Response<pb::GetMonthlyStatsResponse>, Status> {
        not_yet!("CreditsService.GetMonthlyStats")
    }

    async fn get_credit_info(
        &self,
        _request: Request<pb::GetCreditInfoRequest>,
    ) -> Result<Response<pb::GetCreditInfoResponse>, Status> {
        not_yet!("CreditsService.GetCreditInfo")
    }

    async fn list_rates(
        &self,
        _request: Request<pb::ListRatesRequest>,
    ) -> Result<Response<pb::ListRatesResponse>, Status> {
        let rates = catalog::list_rates(&self.state.db).await?;
        Ok(Response::new(pb::ListRatesResponse {
            rates: rates.into_iter().map(convert::rate).collect(),
        }))
    }
}
