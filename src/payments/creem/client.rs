//! Creem's API over HTTPS (`reqwest` with rustls): checkouts and the
//! customer portal, authenticated by the `x-api-key` header.
//!
//! Every call has a deadline ([`CALL_TIMEOUT`]); a failure of any kind
//! (refused connection, timeout, non-2xx, unreadable answer) is
//! `UNAVAILABLE` with no provider text, the detail logged. Creem takes no
//! idempotency key: a checkout carries `request_id` = the order id, so
//! any checkout of an order, even one opened twice by a retry, pays that
//! one order, which is fulfilled at most once.

use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};

use super::wire::{CheckoutAnswer, CheckoutRequest, PortalAnswer, PortalRequest};
use crate::error::Error;

/// The most one Creem call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Creem {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl std::fmt::Debug for Creem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Creem")
    }
}

fn unavailable(what: &str, detail: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %detail, "Creem {what} failed");
    Error::Unavailable("the payment provider did not answer; retry later".into())
}

impl Creem {
    /// A client for `api_key` on `api_base` (normally
    /// `https://api.creem.io`; tests point it at a local fake).
    pub fn new(api_key: &str, api_base: &str) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| Error::internal(format!("Creem client: {e}")))?;
        Ok(Self {
            http,
            base: api_base.trim_end_matches('/').to_owned(),
            key: api_key.to_owned(),
        })
    }

    async fn post<B: Serialize, A: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &B,
    ) -> Result<A, Error> {
        let span = tracing::info_span!(
            "provider",
            otel.name = %format_args!("creem POST {path}"),
            otel.kind = "client",
            provider = "creem",
            http.response.status_code = tracing::field::Empty,
        );
        let call = async {
            // The caller's trace goes on at Creem (W3C traceparent).
            let mut headers = http::HeaderMap::new();
            crate::telemetry::inject_current(&mut headers);
            let response = self
                .http
                .post(format!("{}{path}", self.base))
                .headers(headers)
                .header("x-api-key", &self.key)
                .json(body)
                .send()
                .await
                .map_err(|e| unavailable(what, e))?;
            let status = response.status();
            tracing::Span::current().record("http.response.status_code", status.as_u16());
            if !status.is_success() {
                return Err(unavailable(what, format!("status {status}")));
            }
            response.json().await.map_err(|e| unavailable(what, e))
        };
        tracing::Instrument::instrument(call, span).await
    }

    /// Opens a checkout.
    pub async fn checkout(&self, request: &CheckoutRequest) -> Result<CheckoutAnswer, Error> {
        self.post("checkout", "/v1/checkouts", request).await
    }

    /// The customer portal's link for `customer`.
    pub async fn portal(&self, customer: &str) -> Result<String, Error> {
        let answer: PortalAnswer = self
            .post(
                "customer portal",
                "/v1/customers/billing",
                &PortalRequest {
                    customer_id: customer.to_owned(),
                },
            )
            .await?;
        Ok(answer.customer_portal_link)
    }
}
