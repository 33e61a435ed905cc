//! Creem's wire types: the checkout and portal requests and answers, and
//! the few fields of a webhook event the service acts on, read from the
//! raw JSON (Creem adds fields; sub-objects may come expanded or as ids).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;

/// `POST /v1/checkouts`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckoutRequest {
    pub product_id: String,
    /// The order id: Creem echoes it on the checkout and its events.
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_url: Option<String>,
    pub metadata: CheckoutMetadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<CustomerRef>,
    /// A discount code defined at Creem (the service's coupon code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discount_code: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckoutMetadata {
    pub order_id: String,
    pub org_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CustomerRef {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutAnswer {
    pub id: String,
    pub checkout_url: String,
}

/// `POST /v1/customers/billing`.
#[derive(Debug, Clone, Serialize)]
pub struct PortalRequest {
    pub customer_id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PortalAnswer {
    pub customer_portal_link: String,
}

/// The service's metadata, as Creem carries it back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub order: Option<String>,
    pub org: Option<String>,
    pub plan: Option<String>,
}

/// A subscription as Creem's events carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub status: String,
    pub customer: Option<String>,
    pub product: Option<String>,
    pub period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub metadata: Metadata,
    /// The payment of the period (`last_transaction_id`).
    pub transaction: Option<String>,
    pub amount_cents: Option<i64>,
}

/// A completed checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub id: String,
    /// `request_id`, else `metadata.order_id`: the service's order.
    pub order: Option<String>,
    pub metadata: Metadata,
    pub customer: Option<String>,
    /// Creem's order (the payment) and its amount.
    pub payment: Option<String>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub subscription: Option<Subscription>,
}

/// A refund: its own amount (not cumulative), and what it refunds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    pub amount_cents: i64,
    /// Ids that may name the refunded payment: transaction, Creem order.
    pub payments: Vec<String>,
    pub checkout: Option<String>,
    pub order: Option<String>,
    pub subscription: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    CheckoutCompleted(Box<Checkout>),
    SubscriptionPaid(Subscription),
    SubscriptionCanceled(Subscription),
    RefundCreated(Refund),
    /// Any other type: acknowledged and ignored.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
    pub created: Option<DateTime<Utc>>,
    pub event: Event,
}

/// A string field, or the `id` of an expanded object.
fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Object(o)) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// A time: RFC 3339 text, or Unix seconds or milliseconds.
fn time(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    match v.get(key)? {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        Value::Number(n) => {
            let n = n.as_i64()?;
            if n > 100_000_000_000 {
                DateTime::from_timestamp_millis(n)
            } else {
                DateTime::from_timestamp(n, 0)
            }
        }
        _ => None,
    }
}

fn metadata(v: Option<&Value>) -> Metadata {
    let Some(m) = v else {
        return Metadata::default();
    };
    Metadata {
        order: text(m, "order_id"),
        org: text(m, "org_id"),
        plan: text(m, "plan_id"),
    }
}

fn subscription(v: &Value) -> Result<Subscription, Error> {
    let id = text(v, "id").ok_or_else(|| Error::invalid("object.id", "missing"))?;
    let start = time(v, "current_period_start_date").or_else(|| time(v, "current_period_start"));
    let end = time(v, "current_period_end_date").or_else(|| time(v, "current_period_end"));
    let transaction = v.get("last_transaction");
    Ok(Subscription {
        id,
        status: text(v, "status").unwrap_or_default(),
        customer: text(v, "customer"),
        product: text(v, "product"),
        period: start.zip(end),
        metadata: metadata(v.get("metadata")),
        transaction: text(v, "last_transaction_id").or_else(|| {
            transaction.and_then(|t| text(t, "id").or_else(|| t.as_str().map(str::to_owned)))
        }),
        amount_cents: transaction
            .and_then(|t| t.get("amount"))
            .and_then(Value::as_i64),
    })
}

fn checkout(v: &Value) -> Result<Checkout, Error> {
    let id = text(v, "id").ok_or_else(|| Error::invalid("object.id", "missing"))?;
    let meta = metadata(v.get("metadata"));
    let order = v.get("order");
    let subscription = match v.get("subscription") {
        Some(s @ Value::Object(_)) => {
            let mut s = subscription(s)?;
            if s.metadata == Metadata::default() {
                s.metadata = meta.clone();
            }
            if s.product.is_none() {
                s.product = text(v, "product");
            }
            if s.customer.is_none() {
                s.customer = text(v, "customer");
            }
            Some(s)
        }
        Some(Value::String(id)) if !id.is_empty() => Some(Subscription {
            id: id.clone(),
            status: "active".into(),
            customer: text(v, "customer"),
            product: text(v, "product"),
            period: None,
            metadata: meta.clone(),
            transaction: None,
            amount_cents: None,
        }),
        _ => None,
    };
    Ok(Checkout {
        id,
        order: text(v, "request_id").or_else(|| meta.order.clone()),
        metadata: meta,
        customer: text(v, "customer"),
        payment: order.and_then(|o| {
            text(o, "transaction").or_else(|| o.get("id")?.as_str().map(str::to_owned))
        }),
        amount_cents: order.and_then(|o| o.get("amount")).and_then(Value::as_i64),
        currency: order.and_then(|o| text(o, "currency")),
        subscription,
    })
}

fn refund(v: &Value) -> Result<Refund, Error> {
    let id = text(v, "id").ok_or_else(|| Error::invalid("object.id", "missing"))?;
    let amount_cents = v
        .get("refund_amount")
        .or_else(|| v.get("amount"))
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::invalid("object.refund_amount", "missing"))?;
    let payments = ["transaction", "order"]
        .iter()
        .filter_map(|k| text(v, k))
        .collect();
    let checkout = v.get("checkout");
    Ok(Refund {
        id,
        amount_cents,
        payments,
        checkout: text(v, "checkout"),
        order: checkout
            .and_then(|c| text(c, "request_id").or_else(|| metadata(c.get("metadata")).order))
            .or_else(|| metadata(v.get("metadata")).order),
        subscription: text(v, "subscription"),
    })
}

/// Reads an event from its raw body (already verified).
pub fn parse(body: &[u8]) -> Result<Envelope, Error> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid("body", format!("not a JSON event: {e}")))?;
    let id = text(&v, "id").ok_or_else(|| Error::invalid("id", "missing"))?;
    let kind = text(&v, "eventType").ok_or_else(|| Error::invalid("eventType", "missing"))?;
    let object = v.get("object").cloned().unwrap_or(Value::Null);
    let event = match kind.as_str() {
        "checkout.completed" => Event::CheckoutCompleted(Box::new(checkout(&object)?)),
        "subscription.paid" => Event::SubscriptionPaid(subscription(&object)?),
        "subscription.canceled" => Event::SubscriptionCanceled(subscription(&object)?),
        "refund.created" => Event::RefundCreated(refund(&object)?),
        _ => Event::Other(kind.clone()),
    };
    Ok(Envelope {
        id,
        kind,
        created: time(&v, "created_at"),
        event,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap_or_default()
    }

    #[test]
    fn a_subscription_checkout_carries_its_order_subscription_and_period() -> Result<(), Error> {
        let e = parse(&body(json!({
            "id": "evt_1", "eventType": "checkout.completed", "created_at": 1_700_000_000_000_i64,
            "object": {"id": "ch_1", "request_id": "ord_1", "product": {"id": "prod_pro"},
                "customer": {"id": "cust_1"}, "metadata": {"order_id": "ord_1", "org_id": "acme"},
                "order": {"id": "o_1", "amount": 999, "currency": "USD", "transaction": "tran_1"},
                "subscription": {"id": "sub_1", "status": "active",
                    "current_period_start_date": "2026-12-01T00:00:00.000Z",
                    "current_period_end_date": "2027-01-01T00:00:00Z"}}
        })))?;
        let Event::CheckoutCompleted(c) = e.event else {
            panic!("not a checkout: {:?}", e.event);
        };
        assert_eq!(c.order.as_deref(), Some("ord_1"));
        assert_eq!(c.payment.as_deref(), Some("tran_1"));
        let sub = c.subscription.unwrap_or_else(|| panic!("no subscription"));
        assert_eq!(sub.product.as_deref(), Some("prod_pro"));
        assert_eq!(sub.customer.as_deref(), Some("cust_1"));
        assert_eq!(sub.metadata.org.as_deref(), Some("acme"));
        assert!(sub.period.is_some());
        assert!(e.created.is_some());
        Ok(())
    }

    #[test]
    fn refunds_need_an_amount_and_other_types_are_acknowledged() {
        let r = parse(&body(json!({"id": "evt_2", "eventType": "refund.created",
            "object": {"id": "ref_1"}})));
        assert!(
            matches!(r, Err(Error::InvalidArgument { field, .. }) if field == "object.refund_amount")
        );
        let other = parse(&body(
            json!({"id": "evt_3", "eventType": "dispute.created", "object": {}}),
        ));
        assert!(matches!(
            other,
            Ok(Envelope {
                event: Event::Other(_),
                ..
            })
        ));
    }
}
