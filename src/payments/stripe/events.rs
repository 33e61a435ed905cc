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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    CheckoutCompleted(SessionInfo),
    AsyncPaymentSucceeded(SessionInfo),
    AsyncPaymentFailed(SessionInfo),
    CheckoutExpired(SessionInfo),
    /// `amount_refunded` is cumulative over the charge's refunds.
    ChargeRefunded {
        payment_intent: Option<String>,
        amount_refunded: i64,
    },
    DisputeClosed {
        id: String,
        payment_intent: Option<String>,
        status: String,
    },
    /// A type the service handles but whose capability is not built yet
    /// (subscriptions): answered 503 so that Stripe delivers it again.
    NotYet(String),
    /// Any other type: acknowledged and ignored.
    Other(String),
}

/// An event: its id, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
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
        "charge.refunded" => Event::ChargeRefunded {
            payment_intent: text(&object, "payment_intent"),
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
        "invoice.paid"
        | "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => Event::NotYet(kind.clone()),
        _ => Event::Other(kind.clone()),
    };
    Ok(Envelope { id, kind, event })
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
            })
        );
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
