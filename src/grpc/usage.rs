//! `UsageService`: the metering hot path (role `service`).

use tonic::{Request, Response, Status};

use super::{
    convert,
    input::{self, MAX_ID, MAX_TEXT},
};
use crate::{
    error::Error,
    ledger::{CommitInput, ConsumeInput, HoldAmount, ReleaseInput, ReserveInput},
    pb,
    state::AppState,
};

/// Default and largest hold lifetime, seconds.
const DEFAULT_TTL: i32 = 300;
const MAX_TTL: i32 = 3600;

pub struct UsageApi {
    state: AppState,
}

impl UsageApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn model(value: Option<&str>) -> Result<Option<String>, Error> {
    input::optional("model", value, 128)
}

#[tonic::async_trait]
impl pb::usage_service_server::UsageService for UsageApi {
    #[tracing::instrument(skip_all, fields(org_id = %request.get_ref().org_id))]
    async fn consume(
        &self,
        request: Request<pb::ConsumeRequest>,
    ) -> Result<Response<pb::ConsumeResponse>, Status> {
        self.state.require_credits()?;
        let r = request.into_inner();
        let input = ConsumeInput {
            org: input::required("org_id", &r.org_id, MAX_ID)?,
            meter: input::meter("meter", &r.meter)?,
            quantity: input::positive("quantity", r.quantity)?,
            model: model(r.model.as_deref())?,
            key: input::required("idempotency_key", &r.idempotency_key, MAX_ID)?,
            description: input::optional("description", r.description.as_deref(), MAX_TEXT)?,
        };
        let out = self.state.ledger.consume(input).await?;
        Ok(Response::new(pb::ConsumeResponse {
            transaction_id: out.transaction_id,
            charged_micros: out.charged_micros,
            balance_micros: out.balance_micros,
            duplicate: out.duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = %request.get_ref().org_id))]
    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        self.state.require_credits()?;
        let r = request.into_inner();
        let amount = match (
            r.amount_micros,
            r.meter.as_deref().filter(|m| !m.is_empty()),
            r.quantity,
        ) {
            (Some(micros), None, None) => {
                HoldAmount::Micros(input::positive("amount_micros", micros)?)
            }
            (None, Some(meter), Some(quantity)) => HoldAmount::Usage {
                meter: input::meter("meter", meter)?,
                quantity: input::positive("quantity", quantity)?,
                model: model(r.model.as_deref())?,
            },
            (None, Some(_), None) => {
                return Err(Error::invalid("quantity", "is required with meter").into());
            }
            (None, None, Some(_)) => {
                return Err(Error::invalid("meter", "is required with quantity").into());
            }
            (None, None, None) => {
                return Err(Error::invalid(
                    "amount_micros",
                    "give amount_micros, or meter and quantity",
                )
                .into());
            }
            (Some(_), _, _) => {
                return Err(Error::invalid(
                    "amount_micros",
                    "give amount_micros or meter and quantity, not both",
                )
                .into());
            }
        };
        let ttl = r.ttl_seconds.unwrap_or(DEFAULT_TTL);
        if !(1..=MAX_TTL).contains(&ttl) {
            return Err(
                Error::invalid("ttl_seconds", format!("must be between 1 and {MAX_TTL}")).into(),
            );
        }
        let input = ReserveInput {
            org: input::required("org_id", &r.org_id, MAX_ID)?,
            amount,
            ttl_seconds: ttl.into(),
            key: input::required("idempotency_key", &r.idempotency_key, MAX_ID)?,
        };
        let out = self.state.ledger.reserve(input).await?;
        Ok(Response::new(pb::ReserveResponse {
            reservation_id: out.reservation_id,
            held_micros: out.held_micros,
            expires_at: Some(convert::timestamp(out.expires_at)),
            duplicate: out.duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(reservation_id = %request.get_ref().reservation_id))]
    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        self.state.require_credits()?;
        let r = request.into_inner();
        let input = CommitInput {
            reservation_id: input::required("reservation_id", &r.reservation_id, MAX_ID)?,
            meter: input::meter("meter", &r.meter)?,
            quantity: input::non_negative("quantity", r.quantity)?,
            model: model(r.model.as_deref())?,
            description: input::optional("description", r.description.as_deref(), MAX_TEXT)?,
            org: None,
        };
        let out = self.state.ledger.commit(input).await?;
        Ok(Response::new(pb::CommitResponse {
            transaction_id: out.transaction_id,
            charged_micros: out.charged_micros,
            shortfall_micros: out.shortfall_micros,
            released_micros: out.released_micros,
            balance_micros: out.balance_micros,
        }))
    }

    #[tracing::instrument(skip_all, fields(reservation_id = %request.get_ref().reservation_id))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.state.require_credits()?;
        let r = request.into_inner();
        let input = ReleaseInput {
            reservation_id: input::required("reservation_id", &r.reservation_id, MAX_ID)?,
            org: None,
        };
        let out = self.state.ledger.release(input).await?;
        Ok(Response::new(pb::ReleaseResponse {
            released_micros: out.released_micros,
            balance_micros: out.balance_micros,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = %request.get_ref().org_id))]
    async fn check_allowance(
        &self,
        request: Request<pb::CheckAllowanceRequest>,
    ) -> Result<Response<pb::CheckAllowanceResponse>, Status> {
        self.state.require_credits()?;
        let org = input::required("org_id", &request.get_ref().org_id, MAX_ID)?;
        let balance = crate::ledger::reads::balance(&self.state.ledger, &org).await?;
        let available = balance.available().max(0);
        Ok(Response::new(pb::CheckAllowanceResponse {
            allow_usage: available > 0,
            available_micros: available,
        }))
    }
}
