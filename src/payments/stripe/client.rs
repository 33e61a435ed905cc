//! Stripe's API through `async-stripe`: customers, checkout sessions,
//! billing-portal sessions and subscription retrieval.
//!
//! Every call has a deadline ([`CALL_TIMEOUT`]), and a failure of any kind
//! (refused connection, timeout, 5xx, unreadable answer) is
//! `UNAVAILABLE` with no provider text; the detail is logged. Calls that
//! create something carry an `Idempotency-Key` derived from what they are
//! for (`customer-<org>`, `checkout-<order>`), so a retried call never
//! creates a second customer or session.

use std::{collections::HashMap, time::Duration};
use tracing::Instrument as _;

use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::RetrieveSubscription;
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionLineItemsPriceData,
    CreateCheckoutSessionLineItemsPriceDataRecurring,
    CreateCheckoutSessionLineItemsPriceDataRecurringInterval as RecurringInterval,
    CreateCheckoutSessionSubscriptionData, ProductData,
};
use stripe_core::customer::CreateCustomer;

use crate::error::Error;

/// The most one Stripe call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A configured Stripe account.
#[derive(Clone)]
pub struct Stripe {
    client: Client,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stripe")
    }
}

/// How often a subscription renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Month,
    Year,
}

/// What a checkout sells: a pack once, or a plan every interval.
pub enum Sale<'a> {
    Pack,
    Plan {
        plan_id: &'a str,
        interval: Interval,
    },
}

/// What a checkout is for.
pub struct CheckoutRequest<'a> {
    pub sale: Sale<'a>,
    pub order_id: &'a str,
    pub org: &'a str,
    pub customer: &'a str,
    pub name: &'a str,
    pub currency: &'a str,
    pub amount_cents: i64,
    pub price_id: Option<&'a str>,
    pub success_url: Option<&'a str>,
    pub cancel_url: Option<&'a str>,
}

/// A created checkout session.
pub struct Session {
    pub id: String,
    pub url: String,
}

fn unavailable(what: &str, e: StripeError) -> Error {
    tracing::warn!(error = %e, "Stripe {what} failed");
    Error::Unavailable("the payment provider did not answer; retry later".into())
}

fn key(value: &str) -> Result<RequestStrategy, Error> {
    IdempotencyKey::new(value)
        .map(RequestStrategy::Idempotent)
        .map_err(|e| Error::internal(format!("idempotency key {value}: {e}")))
}

impl Stripe {
    /// A client for `secret_key` on `api_base` (normally
    /// `https://api.stripe.com`; tests point it at a local fake).
    pub fn new(secret_key: &str, api_base: &str) -> Result<Self, Error> {
        // The crate joins `v1/...` onto the base: it must end in `/`.
        let base = format!("{}/", api_base.trim_end_matches('/'));
        let client = ClientBuilder::new(secret_key)
            .url(base)
            .build()
            .map_err(|e| Error::internal(format!("Stripe client: {e}")))?;
        Ok(Self { client })
    }

    /// Creates the organization's customer (`metadata[org_id]`).
    pub async fn create_customer(&self, org: &str) -> Result<String, Error> {
        let request = CreateCustomer::new()
            .metadata(HashMap::from([("org_id".to_owned(), org.to_owned())]))
            .customize()
            .request_strategy(key(&format!("customer-{org}"))?)
            .timeout(CALL_TIMEOUT);
        let customer = request
            .send(&self.client)
            .instrument(stripe_span())
            .await
            .map_err(|e| unavailable("customer creation", e))?;
        Ok(customer.id.to_string())
    }

    /// Opens a checkout: a one-time payment (`payment` mode) for a pack, a
    /// `subscription` mode one for a plan, whose subscription carries the
    /// organization and plan in its metadata.
    pub async fn checkout(&self, c: &CheckoutRequest<'_>) -> Result<Session, Error> {
        let mut item = CreateCheckoutSessionLineItems::new();
        item.quantity = Some(1);
        match c.price_id {
            Some(price) => item.price = Some(price.to_owned()),
            None => {
                let currency: stripe_types::Currency = c
                    .currency
                    .to_ascii_lowercase()
                    .parse()
                    .map_err(|_| Error::internal(format!("unknown currency {}", c.currency)))?;
                let mut price = CreateCheckoutSessionLineItemsPriceData::new(currency);
                price.unit_amount = Some(c.amount_cents);
                price.product_data = Some(ProductData::new(c.name));
                if let Sale::Plan { interval, .. } = c.sale {
                    price.recurring = Some(CreateCheckoutSessionLineItemsPriceDataRecurring {
                        interval: match interval {
                            Interval::Month => RecurringInterval::Month,
                            Interval::Year => RecurringInterval::Year,
                        },
                        interval_count: None,
                    });
                }
                item.price_data = Some(price);
            }
        }
        let metadata = HashMap::from([
            ("order_id".to_owned(), c.order_id.to_owned()),
            ("org_id".to_owned(), c.org.to_owned()),
        ]);
        let mut request = CreateCheckoutSession::new()
            .client_reference_id(c.order_id)
            .customer(c.customer)
            .metadata(metadata.clone())
            .line_items(vec![item]);
        request = match c.sale {
            Sale::Pack => request.mode(CheckoutSessionMode::Payment),
            Sale::Plan { plan_id, .. } => {
                let mut data = CreateCheckoutSessionSubscriptionData::new();
                let mut metadata = metadata;
                metadata.insert("plan_id".to_owned(), plan_id.to_owned());
                data.metadata = Some(metadata);
                request
                    .mode(CheckoutSessionMode::Subscription)
                    .subscription_data(data)
            }
        };
        if let Some(url) = c.success_url {
            request = request.success_url(url);
        }
        if let Some(url) = c.cancel_url {
            request = request.cancel_url(url);
        }
        let session = request
            .customize()
            .request_strategy(key(&format!("checkout-{}", c.order_id))?)
            .timeout(CALL_TIMEOUT)
            .send(&self.client)
            .instrument(stripe_span())
            .await
            .map_err(|e| unavailable("checkout session", e))?;
        Ok(Session {
            id: session.id.to_string(),
            url: session.url.unwrap_or_default(),
        })
    }

    /// The subscription `id` as Stripe has it now, as raw JSON: read
    /// tolerantly (see [`super::events::subscription`]) rather than into
    /// the crate's strict type, which fails on any field Stripe moved.
    pub async fn subscription(&self, id: &str) -> Result<serde_json::Value, Error> {
        let raw: miniserde::json::Value = RetrieveSubscription::new(id)
            .build()
            .customize()
            .timeout(CALL_TIMEOUT)
            .send(&self.client)
            .instrument(stripe_span())
            .await
            .map_err(|e| unavailable("subscription retrieval", e))?;
        serde_json::from_str(&miniserde::json::to_string(&raw))
            .map_err(|e| Error::internal(format!("Stripe subscription {id}: {e}")))
    }

    /// A billing-portal session for `customer`; its URL.
    pub async fn portal(&self, customer: &str, return_url: Option<&str>) -> Result<String, Error> {
        let mut request = CreateBillingPortalSession::new().customer(customer);
        if let Some(url) = return_url {
            request = request.return_url(url);
        }
        let session = request
            .customize()
            .timeout(CALL_TIMEOUT)
            .send(&self.client)
            .instrument(stripe_span())
            .await
            .map_err(|e| unavailable("billing portal session", e))?;
        Ok(session.url)
    }
}

/// The span of one Stripe call. async-stripe's client has no way to add a
/// header to a request, so the trace stops here rather than at Stripe
/// (which does not read `traceparent` anyway).
fn stripe_span() -> tracing::Span {
    tracing::info_span!(
        "provider",
        otel.name = "stripe",
        otel.kind = "client",
        provider = "stripe"
    )
}
