//! `CreditsService`: balance, ledger and statistics reads for the caller's
//! organization; `ListRates` is public.

use tonic::{Request, Response, Status};

use super::{convert, input};
use crate::{auth::caller, catalog, error::Error, ledger::reads, pb, state::AppState};

pub struct CreditsApi {
    state: AppState,
}

impl CreditsApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn stat(m: &reads::MonthStat) -> pb::MonthlyStat {
    pb::MonthlyStat {
        month: m.month.map(convert::timestamp),
        consumption_micros: m.consumption,
        purchases_micros: m.purchases,
        grants_micros: m.grants,
        adjustments_micros: m.adjustments,
        balance_micros: m.balance(),
    }
}

#[tonic::async_trait]
impl pb::credits_service_server::CreditsService for CreditsApi {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        self.state.require_credits()?;
        let b = reads::balance(&self.state.ledger, &org).await?;
        Ok(Response::new(pb::GetBalanceResponse {
            balance_micros: b.available(),
            stored_micros: b.stored,
            realtime_micros: b.realtime,
            consumption: Some(pb::Consumption {
                storage_egress_micros: b.storage_egress,
                ai_tokens_micros: b.ai_tokens,
                total_micros: b.storage_egress + b.ai_tokens,
            }),
            period_start: Some(convert::timestamp(b.period_start)),
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        self.state.require_credits()?;
        let r = request.into_inner();
        let (limit, offset) = input::page(r.page.as_ref())?;
        let kind = input::transaction_type(r.r#type.as_deref())?;
        let (rows, total) = reads::transactions(
            &self.state.ledger,
            &self.state.read_db,
            Some(&org),
            kind.as_deref(),
            limit,
            offset,
        )
        .await?;
        let page = convert::page_info(limit, offset, rows.len(), total);
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions: rows.into_iter().map(convert::transaction).collect(),
            page: Some(page),
        }))
    }

    async fn get_monthly_stats(
        &self,
        request: Request<pb::GetMonthlyStatsRequest>,
    ) -> Result<Response<pb::GetMonthlyStatsResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        self.state.require_credits()?;
        let months = request.get_ref().months.unwrap_or(12);
        if !(1..=24).contains(&months) {
            return Err(Error::invalid("months", "must be between 1 and 24").into());
        }
        let (list, totals) =
            reads::monthly_stats(&self.state.ledger, &self.state.read_db, &org, months as u32)
                .await?;
        Ok(Response::new(pb::GetMonthlyStatsResponse {
            months: list.iter().map(stat).collect(),
            totals: Some(stat(&totals)),
        }))
    }

    async fn get_credit_info(
        &self,
        request: Request<pb::GetCreditInfoRequest>,
    ) -> Result<Response<pb::GetCreditInfoResponse>, Status> {
        let org = caller(&request)?.org_id.clone();
        self.state.require_credits()?;
        let info = reads::credit_info(&self.state.ledger, &org).await?;
        let available = info.balance.available().max(0);
        let active_subscription = info.plan.map(|p| pb::ActiveSubscription {
            id: p.code,
            display_name: p.name,
            credits: p.credits_included,
            created_at: Some(convert::timestamp(info.plan_since)),
        });
        Ok(Response::new(pb::GetCreditInfoResponse {
            credits_micros: available,
            breakdown: info
                .lots
                .into_iter()
                .map(|l| pb::CreditLot {
                    id: l.id.to_string(),
                    kind: l.kind.as_str().into(),
                    purchase_kind: l.kind.purchase_kind().into(),
                    allocated_micros: l.allocated,
                    remaining_micros: l.remaining,
                    expires_at: l.expires_at.map(convert::timestamp),
                    created_at: Some(convert::timestamp(l.created_at)),
                })
                .collect(),
            active_subscription,
            allow_usage: available > 0,
        }))
    }

    async fn list_rates(
        &self,
        _request: Request<pb::ListRatesRequest>,
    ) -> Result<Response<pb::ListRatesResponse>, Status> {
        let rates = catalog::list_rates(&self.state.read_db).await?;
        Ok(Response::new(pb::ListRatesResponse {
            rates: rates.into_iter().map(convert::rate).collect(),
        }))
    }
}
