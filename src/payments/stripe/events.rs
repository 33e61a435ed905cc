//! The few fields of a Stripe event the service acts on, read from the raw
//! JSON. Stripe adds fields and moves them between API versions, so
//! nothing else is required: an event of a known type that lacks a field
//! the service does not need still parses, and an unknown type is
//! [`Event::Other`].

use serde_json::Value;

use crate::error::Error;

/// A checkout session, as its events carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    /// `metadata.order_id`, else `client_reference_id`.
    pub order_id: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    pub payment_intent: Option<String>,
    /// `payment` or `subscription`.
    pub mode: String,
    /// The subscription a `subscription` mode checkout started.
    pub subscription: Option<String>,
}

/// `metadata` as the service writes it on checkouts and subscriptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub org: Option<String>,
    pub plan: Option<String>,
    pub order: Option<String>,
}

/// A subscription object (the events' `data.object`, or a retrieved one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub id: String,
    pub status: String,
    pub customer: Option<String>,
    pub metadata: Metadata,
    /// The first item's price, and its interval (`month`, `year`).
    pub price: Option<String>,
    pub interval: Option<String>,
    /// `items.data[].current_period_*`, else the top level's.
    pub period: Option<(i64, i64)>,
    pub cancel_at_period_end: bool,
}

/// A paid invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceInfo {
    pub id: String,
    /// `parent.subscription_details.subscription`, else `subscription`.
    pub subscription: Option<String>,
    pub customer: Option<String>,
    /// The subscription's metadata as the invoice copies it.
    pub metadata: Metadata,
    /// `payment_intent`, else the first of `payments.data[].payment`.
    pub payment_intent: Option<String>,
    pub amount_paid: i64,
    pub currency: String,
    /// The subscription line's price and period, when the invoice has one.
    pub price: Option<String>,
    pub period: Option<(i64, i64)>,
    pub billing_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    CheckoutCompleted(SessionInfo),
    AsyncPaymentSucceeded(SessionInfo),
    AsyncPaymentFailed(SessionInfo),
    CheckoutExpired(SessionInfo),
    InvoicePaid(InvoiceInfo),
    /// `customer.subscription.created` or `.updated`.
    SubscriptionChanged(SubscriptionInfo),
    SubscriptionDeleted(SubscriptionInfo),
    /// `amount_refunded` is cumulative over the charge's refunds.
    ChargeRefunded {
        payment_intent: Option<String>,
        invoice: Option<String>,
        amount_refunded: i64,
    },
    DisputeClosed {
        id: String,
        payment_intent: Option<String>,
        status: String,
    },
    /// Any other type: acknowledged and ignored.
    Other(String),
}

/// An event: its id, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
    /// When Stripe made the event (Unix seconds; 0 when absent).
    pub created: i64,
    pub event: Event,
}

fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        // An expanded object: its id.
        Some(Value::Object(o)) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

/// `v.data[0]`, for Stripe's lists.
fn first(list: Option<&Value>) -> Option<&Value> {
    list?.get("data")?.as_array()?.first()
}

fn metadata(v: Option<&Value>) -> Metadata {
    let Some(m) = v else {
        return Metadata::default();
    };
    Metadata {
        org: text(m, "org_id"),
        plan: text(m, "plan_id"),
        order: text(m, "order_id"),
    }
}

/// Reads a subscription object.
pub fn subscription(object: &Value) -> Result<SubscriptionInfo, Error> {
    let id = text(object, "id").ok_or_else(|| Error::invalid("data.object.id", "missing"))?;
    let item = first(object.get("items"));
    let price = item.and_then(|i| i.get("price"));
    let period_of = |v: &Value| {
        Some((
            int(v, "current_period_start")?,
            int(v, "current_period_end")?,
        ))
    };
    Ok(SubscriptionInfo {
        id,
        status: text(object, "status").unwrap_or_default(),
        customer: text(object, "customer"),
        metadata: metadata(object.get("metadata")),
        price: price.and_then(|p| text(p, "id")),
        interval: price
            .and_then(|p| p.get("recurring"))
            .and_then(|r| text(r, "interval")),
        period: item.and_then(period_of).or_else(|| period_of(object)),
        cancel_at_period_end: object
            .get("cancel_at_period_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

fn invoice(object: &Value) -> Result<InvoiceInfo, Error> {
    let id = text(object, "id").ok_or_else(|| Error::invalid("data.object.id", "missing"))?;
    let details = object
        .get("parent")
        .and_then(|p| p.get("subscription_details"))
        .or_else(|| object.get("subscription_details"));
    // The line of the subscription's price, else the first line.
    let lines = object
        .get("lines")
        .and_then(|l| l.get("data"))
        .and_then(Value::as_array);
    let line_price = |l: &Value| {
        l.get("price").and_then(|p| text(p, "id")).or_else(|| {
            l.get("pricing")
                .and_then(|p| p.get("price_details"))
                .and_then(|d| text(d, "price"))
        })
    };
    let line = lines.and_then(|ls| {
        ls.iter()
            .find(|l| line_price(l).is_some())
            .or_else(|| ls.first())
    });
    let payment_intent = text(object, "payment_intent").or_else(|| {
        first(object.get("payments"))
            .and_then(|p| p.get("payment"))
            .and_then(|p| text(p, "payment_intent"))
    });
    Ok(InvoiceInfo {
        id,
        subscription: details
            .and_then(|d| text(d, "subscription"))
            .or_else(|| text(object, "subscription")),
        customer: text(object, "customer"),
        metadata: metadata(details.and_then(|d| d.get("metadata"))),
        payment_intent,
        amount_paid: int(object, "amount_paid").unwrap_or(0),
        currency: text(object, "currency").unwrap_or_default(),
        price: line.and_then(line_price),
        period: line
            .and_then(|l| l.get("period"))
            .and_then(|p| Some((int(p, "start")?, int(p, "end")?))),
        billing_reason: text(object, "billing_reason"),
    })
}

fn session(object: &Value) -> Result<SessionInfo, Error> {
    let id = text(object, "id").ok_or_else(|| Error::invalid("data.object.id", "missing"))?;
    let order_id = object
        .get("metadata")
        .and_then(|m| text(m, "order_id"))
        .or_else(|| text(object, "client_reference_id"));
    Ok(SessionInfo {
        id,
        order_id,
        payment_status: text(object, "payment_status").unwrap_or_default(),
        payment_intent: text(object, "payment_intent"),
        mode: text(object, "mode").unwrap_or_else(|| "payment".into()),
        subscription: text(object, "subscription"),
    })
}

/// Reads an event from its raw body (already verified).
pub fn parse(body: &[u8]) -> Result<Envelope, Error> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid("body", format!("not a JSON event: {e}")))?;
    let id = text(&v, "id").ok_or_else(|| Error::invalid("id", "missing"))?;
    let kind = text(&v, "type").ok_or_else(|| Error::invalid("type", "missing"))?;
    let object = v
        .get("data")
        .and_then(|d| d.get("object"))
        .cloned()
        .unwrap_or(Value::Null);
    let event = match kind.as_str() {
        "checkout.session.completed" => Event::CheckoutCompleted(session(&object)?),
        "checkout.session.async_payment_succeeded" => {
            Event::AsyncPaymentSucceeded(session(&object)?)
        }
        "checkout.session.async_payment_failed" => Event::AsyncPaymentFailed(session(&object)?),
        "checkout.session.expired" => Event::CheckoutExpired(session(&object)?),
        "invoice.paid" => Event::InvoicePaid(invoice(&object)?),
        "customer.subscription.created" | "customer.subscription.updated" => {
            Event::SubscriptionChanged(subscription(&object)?)
        }
        "customer.subscription.deleted" => Event::SubscriptionDeleted(subscription(&object)?),
        "charge.refunded" => Event::ChargeRefunded {
            payment_intent: text(&object, "payment_intent"),
            invoice: text(&object, "invoice"),
            amount_refunded: object
                .get("amount_refunded")
                .and_then(Value::as_i64)
                .ok_or_else(|| Error::invalid("data.object.amount_refunded", "missing"))?,
        },
        "charge.dispute.closed" => Event::DisputeClosed {
            id: text(&object, "id").unwrap_or_default(),
            payment_intent: text(&object, "payment_intent"),
            status: text(&object, "status").unwrap_or_default(),
        },
        _ => Event::Other(kind.clone()),
    };
    let created = int(&v, "created").unwrap_or(0);
    Ok(Envelope {
        id,
        kind,
        created,
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
    fn a_completed_checkout_names_its_order_and_payment() -> Result<(), Error> {
        let e = parse(&body(json!({
            "id": "evt_1", "type": "checkout.session.completed", "api_version": "2099-01-01",
            "data": {"object": {"id": "cs_1", "client_reference_id": "ord_2",
                "metadata": {"order_id": "ord_1"}, "payment_status": "paid",
                "payment_intent": {"id": "pi_1", "object": "payment_intent"},
                "a_field_from_the_future": true}}
        })))?;
        assert_eq!(
            e.event,
            Event::CheckoutCompleted(SessionInfo {
                id: "cs_1".into(),
                order_id: Some("ord_1".into()),
                payment_status: "paid".into(),
                payment_intent: Some("pi_1".into()),
                mode: "payment".into(),
                subscription: None,
            })
        );
        Ok(())
    }

    #[test]
    fn invoices_and_subscriptions_read_old_and_new_api_shapes() -> Result<(), Error> {
        // Newer API: subscription under `parent`, periods on the items.
        let new = parse(&body(json!({
            "id": "evt_4", "type": "invoice.paid", "created": 1_700_000_000,
            "data": {"object": {"id": "in_1", "amount_paid": 999, "currency": "usd",
                "billing_reason": "subscription_cycle",
                "parent": {"subscription_details": {"subscription": "sub_1",
                    "metadata": {"org_id": "acme", "plan_id": "plan_pro"}}},
                "payments": {"data": [{"payment": {"payment_intent": "pi_9"}}]},
                "lines": {"data": [{"period": {"start": 10, "end": 20},
                    "pricing": {"price_details": {"price": "price_pro_m"}}}]}}}
        })))?;
        let Event::InvoicePaid(inv) = new.event else {
            panic!("not an invoice: {:?}", new.event);
        };
        assert_eq!(new.created, 1_700_000_000);
        assert_eq!(inv.subscription.as_deref(), Some("sub_1"));
        assert_eq!(inv.metadata.org.as_deref(), Some("acme"));
        assert_eq!(inv.payment_intent.as_deref(), Some("pi_9"));
        assert_eq!(inv.price.as_deref(), Some("price_pro_m"));
        assert_eq!(inv.period, Some((10, 20)));
        // Older API: top-level fields.
        let old = parse(&body(json!({
            "id": "evt_5", "type": "invoice.paid",
            "data": {"object": {"id": "in_2", "subscription": "sub_2", "payment_intent": "pi_2"}}
        })))?;
        let Event::InvoicePaid(inv) = old.event else {
            panic!("not an invoice: {:?}", old.event);
        };
        assert_eq!(inv.subscription.as_deref(), Some("sub_2"));
        assert_eq!(inv.payment_intent.as_deref(), Some("pi_2"));
        assert_eq!(inv.period, None);

        let sub = subscription(&json!({"id": "sub_3", "status": "active",
            "current_period_start": 1, "current_period_end": 2,
            "items": {"data": [{"price": {"id": "price_x", "recurring": {"interval": "year"}},
                "current_period_start": 5, "current_period_end": 6}]}}))?;
        assert_eq!(sub.period, Some((5, 6)));
        assert_eq!(sub.interval.as_deref(), Some("year"));
        let top = subscription(&json!({"id": "sub_4", "current_period_start": 1,
            "current_period_end": 2, "items": {"data": [{"price": {"id": "p"}}]}}))?;
        assert_eq!(top.period, Some((1, 2)));
        Ok(())
    }

    #[test]
    fn unknown_types_parse_and_bad_bodies_name_the_field() {
        let other = parse(&body(
            json!({"id": "evt_2", "type": "payout.paid", "data": {}}),
        ));
        assert!(matches!(
            other,
            Ok(Envelope {
                event: Event::Other(_),
                ..
            })
        ));
        let refund = parse(&body(json!({"id": "evt_3", "type": "charge.refunded",
            "data": {"object": {"id": "ch_1"}}})));
        assert!(matches!(refund, Err(Error::InvalidArgument { field, .. })
            if field == "data.object.amount_refunded"));
        assert!(matches!(parse(b"nope"), Err(Error::InvalidArgument { .. })));
    }
}
