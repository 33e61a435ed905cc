//! Webhook intake: verify, skip what was already processed, apply, record.
//!
//! An event id is recorded (`webhook_events`, unique per provider and id)
//! only after its effects are written, and the effects are each exactly
//! once on their own (see [`super::fulfil`] and [`super::subscriptions`]).
//! So "effect applied, acknowledgement lost" is safe: the provider's retry
//! applies nothing twice and is recorded then. Any failure after
//! verification answers an error (5xx) so that the provider delivers the
//! event again.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    sea_query::{OnConflict, Query},
};
use secrecy::ExposeSecret as _;

use super::{
    creem::{self, wire as cw},
    fulfil,
    purchase::{Channel, Period},
    stripe::{
        events::{self, Event, InvoiceInfo, Metadata, SessionInfo, SubscriptionInfo},
        signature,
    },
    subscriptions::{self, Observed, PeriodPayment},
};
use crate::{
    entities::{order, organization, subscription, webhook_event},
    error::{Error, Result},
    ledger::SideWrite,
    state::AppState,
};

async fn seen(state: &AppState, provider: &str, event_id: &str) -> Result<bool> {
    Ok(webhook_event::Entity::find()
        .filter(webhook_event::Column::Provider.eq(provider))
        .filter(webhook_event::Column::EventId.eq(event_id))
        .one(&state.db)
        .await?
        .is_some())
}

fn event_row(
    provider: &str,
    event_id: &str,
    kind: &str,
    now: DateTime<Utc>,
) -> webhook_event::ActiveModel {
    webhook_event::ActiveModel {
        provider: Set(provider.into()),
        event_id: Set(event_id.into()),
        event_type: Set(kind.chars().take(128).collect()),
        received_at: Set(now),
        ..Default::default()
    }
}

fn on_conflict() -> OnConflict {
    OnConflict::columns([
        webhook_event::Column::Provider,
        webhook_event::Column::EventId,
    ])
    .do_nothing()
    .to_owned()
}

async fn record(state: &AppState, provider: &str, event_id: &str, kind: &str) -> Result<()> {
    webhook_event::Entity::insert(event_row(provider, event_id, kind, state.clock.now()))
        .on_conflict(on_conflict())
        .exec_without_returning(&state.db)
        .await?;
    Ok(())
}

/// What became of a delivery that was answered 2xx.
enum Delivery {
    Applied,
    /// Seen before: acknowledged again, applied once.
    Duplicate,
}

/// Counts a delivery by provider, event type and outcome (Prometheus). The
/// type is known only once the signature has been checked and the body
/// parsed; before that it is `unknown`.
fn count_delivery(provider: &'static str, kind: Option<String>, result: &Result<Delivery>) {
    let outcome = match result {
        Ok(Delivery::Applied) => "applied",
        Ok(Delivery::Duplicate) => "duplicate",
        // Refused as sent (bad signature, unreadable body, provider not
        // configured): the provider's retry will not help.
        Err(
            Error::InvalidSignature(_)
            | Error::InvalidArgument { .. }
            | Error::PaymentProviderNotConfigured(_),
        ) => "rejected",
        // Anything else is the service failing: answered 5xx or 4xx after
        // a rule refused it, and the provider retries.
        Err(_) => "failed",
    };
    metrics::counter!(
        crate::metrics::WEBHOOK_EVENTS,
        "provider" => provider,
        "type" => kind.unwrap_or_else(|| "unknown".into()),
        "outcome" => outcome,
    )
    .increment(1);
}

/// A Stripe event: `signature` is the `Stripe-Signature` header.
pub async fn stripe(state: &AppState, body: &[u8], signature_header: &str) -> Result<()> {
    let mut kind = None;
    let result = stripe_delivery(state, body, signature_header, &mut kind).await;
    count_delivery("stripe", kind, &result);
    result.map(|_| ())
}

async fn stripe_delivery(
    state: &AppState,
    body: &[u8],
    signature_header: &str,
    kind: &mut Option<String>,
) -> Result<Delivery> {
    let secret = state
        .config
        .stripe_webhook_secret
        .as_ref()
        .ok_or(Error::PaymentProviderNotConfigured("stripe"))?;
    let now = state.clock.now();
    signature::verify(
        secret.expose_secret(),
        signature_header,
        body,
        now.timestamp(),
    )?;
    let envelope = events::parse(body)?;
    *kind = Some(envelope.kind.clone());
    if seen(state, "stripe", &envelope.id).await? {
        return Ok(Delivery::Duplicate);
    }
    let as_of = DateTime::from_timestamp(envelope.created, 0)
        .filter(|_| envelope.created > 0)
        .unwrap_or(now);
    apply_stripe(state, &envelope.event, as_of).await?;
    record(state, "stripe", &envelope.id, &envelope.kind).await?;
    Ok(Delivery::Applied)
}

/// A Creem event: `signature` is the `creem-signature` header.
pub async fn creem(state: &AppState, body: &[u8], signature_header: &str) -> Result<()> {
    let mut kind = None;
    let result = creem_delivery(state, body, signature_header, &mut kind).await;
    count_delivery("creem", kind, &result);
    result.map(|_| ())
}

async fn creem_delivery(
    state: &AppState,
    body: &[u8],
    signature_header: &str,
    kind: &mut Option<String>,
) -> Result<Delivery> {
    let secret = state
        .config
        .creem_webhook_secret
        .as_ref()
        .ok_or(Error::PaymentProviderNotConfigured("creem"))?;
    creem::signature::verify(secret.expose_secret(), signature_header, body)?;
    let envelope = cw::parse(body)?;
    *kind = Some(envelope.kind.clone());
    if seen(state, "creem", &envelope.id).await? {
        return Ok(Delivery::Duplicate);
    }
    let as_of = envelope.created.unwrap_or_else(|| state.clock.now());
    apply_creem(state, &envelope.event, as_of).await?;
    record(state, "creem", &envelope.id, &envelope.kind).await?;
    Ok(Delivery::Applied)
}

/// The order a checkout session is for; `None` when it is not one of
/// this service's (another integration on the same Stripe account).
async fn session_order(state: &AppState, s: &SessionInfo) -> Result<Option<order::Model>> {
    match &s.order_id {
        Some(id) => fulfil::find_order(state, id).await,
        None => Ok(None),
    }
}

fn at(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0)
}

fn period_of(p: Option<(i64, i64)>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    p.and_then(|(s, e)| at(s).zip(at(e)))
}

fn interval_period(interval: Option<&str>) -> Option<Period> {
    match interval? {
        "year" => Some(Period::Yearly),
        "month" => Some(Period::Monthly),
        _ => None,
    }
}

fn stripe_observed(s: &SubscriptionInfo, hint: &Metadata, as_of: DateTime<Utc>) -> Observed {
    Observed {
        channel: Channel::Stripe,
        id: s.id.clone(),
        status: s.status.clone(),
        org: s.metadata.org.clone().or_else(|| hint.org.clone()),
        customer: s.customer.clone(),
        plan: s.metadata.plan.clone().or_else(|| hint.plan.clone()),
        price: s.price.clone(),
        period_kind: interval_period(s.interval.as_deref()),
        period: period_of(s.period),
        cancel_at_period_end: s.cancel_at_period_end,
        as_of,
    }
}

/// The stored Stripe subscription `id`, retrieved from Stripe and
/// recorded when it is unknown or `refresh` is asked (its period is
/// behind). Without a Stripe key, what the event itself says (`fallback`)
/// stands in for the retrieved object.
async fn stripe_subscription(
    state: &AppState,
    id: &str,
    hint: &Metadata,
    fallback: Option<Observed>,
    refresh: bool,
) -> Result<Option<subscription::Model>> {
    let stored = subscriptions::find(&state.db, Channel::Stripe, id).await?;
    if stored.is_some() && !refresh {
        return Ok(stored);
    }
    let observed = match &state.stripe {
        Some(stripe) => {
            let raw = stripe.subscription(id).await?;
            let info = events::subscription(&raw)?;
            Some(stripe_observed(&info, hint, state.clock.now()))
        }
        None => fallback,
    };
    match observed {
        Some(o) => subscriptions::record(state, &o).await,
        None => Ok(stored),
    }
}

async fn stripe_invoice_paid(
    state: &AppState,
    inv: &InvoiceInfo,
    as_of: DateTime<Utc>,
) -> Result<()> {
    let Some(sub_id) = &inv.subscription else {
        // A one-off invoice: not a subscription's period.
        return Ok(());
    };
    let period = period_of(inv.period);
    let fallback = Observed {
        channel: Channel::Stripe,
        id: sub_id.clone(),
        status: "active".into(),
        org: inv.metadata.org.clone(),
        customer: inv.customer.clone(),
        plan: inv.metadata.plan.clone(),
        price: inv.price.clone(),
        period_kind: None,
        period,
        cancel_at_period_end: false,
        as_of,
    };
    let mut row =
        stripe_subscription(state, sub_id, &inv.metadata, Some(fallback.clone()), false).await?;
    let now = state.clock.now();
    let behind = row
        .as_ref()
        .is_some_and(|r| r.current_period_end.is_none_or(|end| end <= now));
    if period.is_none() && behind {
        // The invoice names no period and the stored one is over: the
        // renewal's subscription event has not arrived; ask Stripe.
        row = stripe_subscription(state, sub_id, &inv.metadata, Some(fallback), true).await?;
    }
    let Some(row) = row else {
        return Ok(());
    };
    subscriptions::period_paid(
        state,
        &row,
        &PeriodPayment {
            channel: Channel::Stripe,
            key: inv.id.clone(),
            order: inv.metadata.order.clone(),
            first: inv
                .billing_reason
                .as_deref()
                .map(|r| r == "subscription_create"),
            payment: inv.payment_intent.clone(),
            amount_cents: inv.amount_paid,
            currency: inv.currency.clone(),
            price: inv.price.clone(),
            period,
        },
    )
    .await
}

/// What an order says about the subscription it bought.
async fn order_hint(state: &AppState, order: &order::Model) -> Result<Metadata> {
    let org = organization::Entity::find_by_id(order.org_id)
        .one(&state.db)
        .await?
        .map(|o| o.external_id);
    Ok(Metadata {
        org,
        plan: order.plan_id.clone(),
        order: Some(order.id.clone()),
    })
}

async fn apply_stripe(state: &AppState, event: &Event, as_of: DateTime<Utc>) -> Result<()> {
    match event {
        Event::CheckoutCompleted(s) => {
            let Some(order) = session_order(state, s).await? else {
                return Ok(());
            };
            let paid = matches!(s.payment_status.as_str(), "paid" | "no_payment_required");
            if fulfil::is_subscription(&order) {
                fulfil::subscription_started(state, &order, s.subscription.as_deref(), paid)
                    .await?;
                if let Some(sub) = &s.subscription {
                    let hint = order_hint(state, &order).await?;
                    stripe_subscription(state, sub, &hint, None, false).await?;
                }
                return Ok(());
            }
            if paid {
                fulfil::paid(state, order, s.payment_intent.as_deref()).await
            } else {
                fulfil::awaiting_payment(state, order, s.payment_intent.as_deref()).await
            }
        }
        Event::AsyncPaymentSucceeded(s) => match session_order(state, s).await? {
            Some(order) if fulfil::is_subscription(&order) => {
                fulfil::subscription_started(state, &order, s.subscription.as_deref(), true).await
            }
            Some(order) => fulfil::paid(state, order, s.payment_intent.as_deref()).await,
            None => Ok(()),
        },
        Event::AsyncPaymentFailed(s) => match session_order(state, s).await? {
            Some(order) => fulfil::payment_failed(state, order).await,
            None => Ok(()),
        },
        Event::CheckoutExpired(s) => match session_order(state, s).await? {
            Some(order) => fulfil::expired(state, &order).await,
            None => Ok(()),
        },
        Event::InvoicePaid(inv) => stripe_invoice_paid(state, inv, as_of).await,
        Event::SubscriptionChanged(s) => {
            subscriptions::record(state, &stripe_observed(s, &Metadata::default(), as_of)).await?;
            Ok(())
        }
        Event::SubscriptionDeleted(s) => {
            let mut observed = stripe_observed(s, &Metadata::default(), as_of);
            observed.status = "canceled".into();
            subscriptions::record(state, &observed).await?;
            Ok(())
        }
        Event::ChargeRefunded {
            payment_intent,
            invoice,
            amount_refunded,
        } => {
            let mut order = None;
            if let Some(pi) = payment_intent {
                order = fulfil::order_by_payment(state, pi).await?;
            }
            if order.is_none()
                && let Some(inv) = invoice
            {
                order = fulfil::order_by_invoice(state, Channel::Stripe, inv).await?;
            }
            match order {
                Some(order) => {
                    fulfil::refunded(state, order, *amount_refunded, "refund", Vec::new()).await
                }
                None => Ok(()),
            }
        }
        Event::DisputeClosed {
            id: _,
            payment_intent,
            status,
        } => {
            // Only a lost dispute takes credits back, like a full refund.
            let (Some(pi), "lost") = (payment_intent, status.as_str()) else {
                return Ok(());
            };
            match fulfil::order_by_payment(state, pi).await? {
                Some(order) => {
                    let all = order.amount_cents;
                    fulfil::refunded(state, order, all, "dispute", Vec::new()).await
                }
                None => Ok(()),
            }
        }
        Event::Other(_) => Ok(()),
    }
}

fn creem_observed(s: &cw::Subscription, hint: &Metadata, as_of: DateTime<Utc>) -> Observed {
    Observed {
        channel: Channel::Creem,
        id: s.id.clone(),
        status: s.status.clone(),
        org: s.metadata.org.clone().or_else(|| hint.org.clone()),
        customer: s.customer.clone(),
        plan: s.metadata.plan.clone().or_else(|| hint.plan.clone()),
        price: s.product.clone(),
        period_kind: None,
        period: s.period,
        cancel_at_period_end: false,
        as_of,
    }
}

/// A Creem billing period's payment key: Creem sends a first payment as
/// two events (`checkout.completed`, `subscription.paid`), the period's
/// start names it in both.
fn creem_key(subscription: &str, start: DateTime<Utc>) -> String {
    format!("{subscription}:{}", start.timestamp())
}

async fn creem_checkout(state: &AppState, c: &cw::Checkout, as_of: DateTime<Utc>) -> Result<()> {
    let Some(order) = (match &c.order {
        Some(id) => fulfil::find_order(state, id).await?,
        None => None,
    }) else {
        return Ok(());
    };
    if !fulfil::is_subscription(&order) {
        return fulfil::paid(state, order, c.payment.as_deref()).await;
    }
    let sub = c.subscription.as_ref();
    fulfil::subscription_started(state, &order, sub.map(|s| s.id.as_str()), true).await?;
    let Some(sub) = sub else {
        return Ok(());
    };
    let hint = order_hint(state, &order).await?;
    let Some(row) = subscriptions::record(state, &creem_observed(sub, &hint, as_of)).await? else {
        return Ok(());
    };
    // Without the period this event cannot name the payment the way
    // `subscription.paid` will: that one grants it.
    let Some(period) = sub.period else {
        return Ok(());
    };
    subscriptions::period_paid(
        state,
        &row,
        &PeriodPayment {
            channel: Channel::Creem,
            key: creem_key(&sub.id, period.0),
            order: Some(order.id.clone()),
            first: Some(true),
            payment: c.payment.clone(),
            amount_cents: c.amount_cents.unwrap_or(order.amount_cents),
            currency: c.currency.clone().unwrap_or_default(),
            price: sub.product.clone(),
            period: Some(period),
        },
    )
    .await
}

async fn creem_paid(state: &AppState, s: &cw::Subscription, as_of: DateTime<Utc>) -> Result<()> {
    let hint = Metadata {
        org: s.metadata.org.clone(),
        plan: s.metadata.plan.clone(),
        order: s.metadata.order.clone(),
    };
    let Some(row) = subscriptions::record(state, &creem_observed(s, &hint, as_of)).await? else {
        return Ok(());
    };
    let period = s
        .period
        .or(row.current_period_start.zip(row.current_period_end))
        .ok_or_else(|| Error::invalid("object.current_period_start_date", "missing"))?;
    subscriptions::period_paid(
        state,
        &row,
        &PeriodPayment {
            channel: Channel::Creem,
            key: creem_key(&s.id, period.0),
            order: s.metadata.order.clone(),
            first: None,
            payment: s.transaction.clone(),
            amount_cents: s.amount_cents.unwrap_or(0),
            currency: String::new(),
            price: s.product.clone(),
            period: Some(period),
        },
    )
    .await
}

/// The order a Creem refund is for.
async fn creem_refund_order(state: &AppState, r: &cw::Refund) -> Result<Option<order::Model>> {
    for payment in &r.payments {
        if let Some(o) = fulfil::order_by_payment(state, payment).await? {
            return Ok(Some(o));
        }
    }
    if let Some(checkout) = &r.checkout
        && let Some(o) = order::Entity::find()
            .filter(order::Column::Channel.eq(Channel::Creem.as_str()))
            .filter(order::Column::ProviderSessionId.eq(checkout.as_str()))
            .one(&state.db)
            .await?
        && !fulfil::is_subscription(&o)
    {
        return Ok(Some(o));
    }
    if let Some(id) = &r.order
        && let Some(o) = fulfil::find_order(state, id).await?
        && !fulfil::is_subscription(&o)
    {
        return Ok(Some(o));
    }
    // A subscription's refund names the subscription: its latest payment.
    match &r.subscription {
        Some(sub) => Ok(order::Entity::find()
            .filter(order::Column::Channel.eq(Channel::Creem.as_str()))
            .filter(order::Column::ProviderSubscriptionId.eq(sub.as_str()))
            .filter(order::Column::ProviderInvoiceId.is_not_null())
            .order_by_desc(order::Column::PaidAt)
            .one(&state.db)
            .await?),
        None => Ok(None),
    }
}

/// The provider name under which Creem refund ids are recorded: a Creem
/// refund event carries its own amount, not a running total, so each
/// refund id is applied once, recorded in the same transaction.
const CREEM_REFUND: &str = "creem-refund";

async fn creem_refund(state: &AppState, r: &cw::Refund) -> Result<()> {
    if seen(state, CREEM_REFUND, &r.id).await? {
        return Ok(());
    }
    let Some(order) = creem_refund_order(state, r).await? else {
        return Ok(());
    };
    let total = order
        .refunded_cents
        .saturating_add(Ord::max(r.amount_cents, 0));
    let mark = Query::insert()
        .into_table(webhook_event::Entity)
        .columns([
            webhook_event::Column::Provider,
            webhook_event::Column::EventId,
            webhook_event::Column::EventType,
            webhook_event::Column::ReceivedAt,
        ])
        .values_panic([
            CREEM_REFUND.into(),
            r.id.clone().into(),
            "refund.created".into(),
            state.clock.now().into(),
        ])
        .to_owned();
    let mark = SideWrite {
        statement: state.db.get_database_backend().build(&mark),
        expect_rows: Some(1),
    };
    fulfil::refunded(
        state,
        order,
        total,
        &format!("creem-refund:{}", r.id),
        vec![mark],
    )
    .await
}

async fn apply_creem(state: &AppState, event: &cw::Event, as_of: DateTime<Utc>) -> Result<()> {
    match event {
        cw::Event::CheckoutCompleted(c) => creem_checkout(state, c, as_of).await,
        cw::Event::SubscriptionPaid(s) => creem_paid(state, s, as_of).await,
        cw::Event::SubscriptionCanceled(s) => {
            let mut observed = creem_observed(s, &Metadata::default(), as_of);
            observed.status = "canceled".into();
            subscriptions::record(state, &observed).await?;
            Ok(())
        }
        cw::Event::RefundCreated(r) => creem_refund(state, r).await,
        cw::Event::Other(_) => Ok(()),
    }
}
