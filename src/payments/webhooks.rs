//! Webhook intake: verify, skip what was already processed, apply, record.
//!
//! An event id is recorded (`webhook_events`, unique per provider and id)
//! only after its effects are written, and the effects are each exactly
//! once on their own (see [`super::fulfil`]). So "effect applied,
//! acknowledgement lost" is safe: the provider's retry applies nothing
//! twice and is recorded then. Any failure after verification answers an
//! error (5xx) so that the provider delivers the event again.

use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, sea_query::OnConflict};
use secrecy::ExposeSecret as _;

use super::{
    fulfil,
    stripe::{
        events::{self, Event, SessionInfo},
        signature,
    },
};
use crate::{
    entities::webhook_event,
    error::{Error, Result},
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

async fn record(state: &AppState, provider: &str, event_id: &str, kind: &str) -> Result<()> {
    let row = webhook_event::ActiveModel {
        provider: Set(provider.into()),
        event_id: Set(event_id.into()),
        event_type: Set(kind.chars().take(128).collect()),
        received_at: Set(state.clock.now()),
        ..Default::default()
    };
    webhook_event::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                webhook_event::Column::Provider,
                webhook_event::Column::EventId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&state.db)
        .await?;
    Ok(())
}

/// A Stripe event: `signature` is the `Stripe-Signature` header.
pub async fn stripe(state: &AppState, body: &[u8], signature_header: &str) -> Result<()> {
    let secret = state
        .config
        .stripe_webhook_secret
        .as_ref()
        .ok_or(Error::PaymentProviderNotConfigured("stripe"))?;
    let now = state.clock.now().timestamp();
    signature::verify(secret.expose_secret(), signature_header, body, now)?;
    let envelope = events::parse(body)?;
    if seen(state, "stripe", &envelope.id).await? {
        return Ok(());
    }
    apply_stripe(state, &envelope.event).await?;
    record(state, "stripe", &envelope.id, &envelope.kind).await
}

/// The order a checkout session is for; `None` when it is not one of
/// this service's (another integration on the same Stripe account).
async fn session_order(
    state: &AppState,
    s: &SessionInfo,
) -> Result<Option<crate::entities::order::Model>> {
    match &s.order_id {
        Some(id) => fulfil::find_order(state, id).await,
        None => Ok(None),
    }
}

async fn apply_stripe(state: &AppState, event: &Event) -> Result<()> {
    match event {
        Event::CheckoutCompleted(s) => {
            let Some(order) = session_order(state, s).await? else {
                return Ok(());
            };
            match s.payment_status.as_str() {
                "paid" | "no_payment_required" => {
                    fulfil::paid(state, order, s.payment_intent.as_deref()).await
                }
                _ => fulfil::awaiting_payment(state, order, s.payment_intent.as_deref()).await,
            }
        }
        Event::AsyncPaymentSucceeded(s) => match session_order(state, s).await? {
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
        Event::ChargeRefunded {
            payment_intent,
            amount_refunded,
        } => {
            let Some(pi) = payment_intent else {
                return Ok(());
            };
            match fulfil::order_by_payment(state, pi).await? {
                Some(order) => fulfil::refunded(state, order, *amount_refunded, "refund").await,
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
                    fulfil::refunded(state, order, all, "dispute").await
                }
                None => Ok(()),
            }
        }
        Event::NotYet(kind) => Err(Error::Unavailable(format!(
            "{kind} events are not handled yet; deliver again later"
        ))),
        Event::Other(_) => Ok(()),
    }
}
