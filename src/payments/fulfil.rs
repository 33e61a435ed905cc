//! What a payment event does to an order and its credits.
//!
//! Each effect is exactly once by construction, not by the event id alone:
//! the order's credits are one lot whose source is the order
//! (`order`/`<order id>`), settled or voided idempotently by the ledger;
//! a refund takes back only what the order's cumulative refunded share
//! grew by since the refunded amount the order records, and moves that
//! record in the same transaction, guarded by the value it read. Two
//! deliveries racing on two replicas therefore serialize on the
//! organization's row: the second finds the work done, or its guard fails
//! and it answers `UNAVAILABLE` so that the provider retries it.

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    sea_query::{Expr, ExprTrait, Query, UpdateStatement},
};

use super::{orders::Status, purchase::Channel};
use crate::{
    coupons::redeem,
    domain::MICROS_PER_CREDIT,
    entities::{credit_lot, order, organization, pack},
    error::{Error, Result},
    ledger::{GrantInput, LotKind, SettleInput, SideWrite, TakeBackInput, VoidInput},
    state::AppState,
};

/// Days a pack's credits last when the pack does not say.
pub const DEFAULT_PACK_EXPIRY_DAYS: i64 = 365;

/// The ledger source of an order's credits.
pub const ORDER_SOURCE: &str = "order";

fn side(db: &impl ConnectionTrait, stmt: &UpdateStatement, expect_rows: Option<u64>) -> SideWrite {
    SideWrite {
        statement: db.get_database_backend().build(stmt),
        expect_rows,
    }
}

fn update_order(id: &str, now: DateTime<Utc>) -> UpdateStatement {
    let mut stmt = Query::update();
    stmt.table(order::Entity)
        .value(order::Column::UpdatedAt, now)
        .and_where(Expr::col(order::Column::Id).eq(id));
    stmt
}

/// An order with its organization's external id and what it buys.
struct Bought {
    order: order::Model,
    org: String,
    credits_micros: i64,
    expiry_days: i64,
}

async fn org_of(state: &AppState, order: &order::Model) -> Result<String> {
    Ok(organization::Entity::find_by_id(order.org_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal(format!("order {} has no organization", order.id)))?
        .external_id)
}

/// A pack order and its pack's terms.
async fn bought(state: &AppState, order: order::Model) -> Result<Bought> {
    let org = org_of(state, &order).await?;
    let pack_id = order
        .pack_id
        .clone()
        .ok_or_else(|| Error::internal(format!("order {} buys no pack", order.id)))?;
    let pack = pack::Entity::find_by_id(pack_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal(format!("order {} names a missing pack", order.id)))?;
    Ok(Bought {
        order,
        org,
        credits_micros: pack.credits.saturating_mul(MICROS_PER_CREDIT),
        expiry_days: pack
            .lot_expiry_days
            .map_or(DEFAULT_PACK_EXPIRY_DAYS, i64::from),
    })
}

/// The order `id`, if it is one of this service's.
pub async fn find_order(state: &AppState, id: &str) -> Result<Option<order::Model>> {
    Ok(order::Entity::find_by_id(id).one(&state.db).await?)
}

/// The subscription-period order of `channel` paid by provider payment `key`.
pub async fn order_by_invoice(
    state: &AppState,
    channel: Channel,
    key: &str,
) -> Result<Option<order::Model>> {
    Ok(order::Entity::find()
        .filter(order::Column::Channel.eq(channel.as_str()))
        .filter(order::Column::ProviderInvoiceId.eq(key))
        .one(&state.db)
        .await?)
}

/// The order paid by `payment_intent`.
pub async fn order_by_payment(
    state: &AppState,
    payment_intent: &str,
) -> Result<Option<order::Model>> {
    Ok(order::Entity::find()
        .filter(order::Column::ProviderPaymentId.eq(payment_intent))
        .one(&state.db)
        .await?)
}

/// Whether an order is for a subscription (whose credits come with each
/// paid period, not with the checkout).
pub fn is_subscription(order: &order::Model) -> bool {
    order.kind == "subscription"
}

/// The ledger source of the credits an order paid for: the order itself
/// for a pack, the provider payment for a subscription period.
fn lot_source(order: &order::Model) -> Option<(String, String)> {
    if is_subscription(order) {
        let channel = Channel::parse("channel", Some(&order.channel)).ok()?;
        let key = order.provider_invoice_id.clone()?;
        Some((channel.period_source().into(), key))
    } else {
        Some((ORDER_SOURCE.into(), order.id.clone()))
    }
}

/// A subscription checkout completed: the order records its subscription,
/// and is `paid` when the money is in (the credits come with the
/// subscription's paid periods).
pub async fn subscription_started(
    state: &AppState,
    order: &order::Model,
    subscription: Option<&str>,
    paid: bool,
) -> Result<()> {
    let now = state.clock.now();
    let mut stmt = update_order(&order.id, now);
    if let Some(s) = subscription {
        stmt.value(order::Column::ProviderSubscriptionId, Some(s.to_owned()));
    }
    if !paid {
        let db = &state.db;
        db.execute_raw(db.get_database_backend().build(&stmt))
            .await?;
        return Ok(());
    }
    stmt.value(order::Column::Status, Status::Paid.as_str())
        .value(order::Column::PaidAt, Some(now))
        .and_where(Expr::col(order::Column::Status).is_in([
            Status::Pending.as_str(),
            Status::Failed.as_str(),
            Status::Expired.as_str(),
        ]));
    // The order turns paid and redeems its coupon together.
    let txn = crate::db::begin_write(&state.db).await?;
    txn.execute_raw(txn.get_database_backend().build(&stmt))
        .await?;
    for w in redeem::redemption_writes(&txn, order, now) {
        txn.execute_raw(w.statement).await?;
    }
    txn.commit().await?;
    let org = org_of(state, order).await?;
    let expires = now + TimeDelta::days(DEFAULT_PACK_EXPIRY_DAYS);
    redeem::grant_bonus(state, order, &org, Some(expires)).await
}

/// The payment arrived: the order's credits become spendable (settling
/// its pending lot, or granting it) and the order is `paid`.
pub async fn paid(state: &AppState, order: order::Model, payment: Option<&str>) -> Result<()> {
    let b = bought(state, order).await?;
    let now = state.clock.now();
    let mut stmt = update_order(&b.order.id, now);
    stmt.value(order::Column::Status, Status::Paid.as_str())
        .value(order::Column::PaidAt, Some(now))
        .and_where(Expr::col(order::Column::Status).is_in([
            Status::Pending.as_str(),
            Status::Failed.as_str(),
            Status::Expired.as_str(),
        ]));
    if let Some(p) = payment {
        stmt.value(order::Column::ProviderPaymentId, Some(p.to_owned()));
    }
    // The order turns paid and redeems its coupon with its credits.
    let mut then = vec![side(&state.db, &stmt, None)];
    then.extend(redeem::redemption_writes(&state.db, &b.order, now));
    let expires_at = Some(now + TimeDelta::days(b.expiry_days));
    state
        .ledger
        .settle(SettleInput {
            org: b.org.clone(),
            entry_kind: "purchase",
            lot_kind: LotKind::TopUp,
            amount: b.credits_micros,
            expires_at,
            source_type: ORDER_SOURCE.into(),
            source_id: b.order.id.clone(),
            description: format!("Credit pack (order {})", b.order.id),
            then,
        })
        .await?;
    redeem::grant_bonus(state, &b.order, &b.org, expires_at).await
}

/// The checkout completed but the money has not arrived (a bank debit):
/// the credits are shown as a `pending` lot, not spendable.
pub async fn awaiting_payment(
    state: &AppState,
    order: order::Model,
    payment: Option<&str>,
) -> Result<()> {
    let b = bought(state, order).await?;
    let now = state.clock.now();
    let mut stmt = update_order(&b.order.id, now);
    stmt.and_where(Expr::col(order::Column::Status).eq(Status::Pending.as_str()));
    if let Some(p) = payment {
        stmt.value(order::Column::ProviderPaymentId, Some(p.to_owned()));
    }
    state
        .ledger
        .grant(GrantInput {
            org: b.org,
            entry_kind: "purchase",
            lot_kind: LotKind::Pending,
            amount: b.credits_micros,
            expires_at: None,
            source_type: ORDER_SOURCE.into(),
            source_id: Some(b.order.id.clone()),
            description: format!("Credit pack (order {}), payment pending", b.order.id),
            then: vec![side(&state.db, &stmt, None)],
        })
        .await?;
    Ok(())
}

/// The delayed payment failed: the pending credits go, the order `failed`.
pub async fn payment_failed(state: &AppState, order: order::Model) -> Result<()> {
    let mut stmt = update_order(&order.id, state.clock.now());
    stmt.value(order::Column::Status, Status::Failed.as_str())
        .and_where(Expr::col(order::Column::Status).eq(Status::Pending.as_str()));
    if is_subscription(&order) {
        // No credits were shown for it.
        let db = &state.db;
        db.execute_raw(db.get_database_backend().build(&stmt))
            .await?;
        return Ok(());
    }
    let b = bought(state, order).await?;
    state
        .ledger
        .void(VoidInput {
            org: b.org,
            source_type: ORDER_SOURCE.into(),
            source_id: b.order.id.clone(),
            then: vec![side(&state.db, &stmt, None)],
        })
        .await?;
    Ok(())
}

/// The checkout expired unpaid.
pub async fn expired(state: &AppState, order: &order::Model) -> Result<()> {
    let mut stmt = update_order(&order.id, state.clock.now());
    stmt.value(order::Column::Status, Status::Expired.as_str())
        .and_where(Expr::col(order::Column::Status).eq(Status::Pending.as_str()));
    let db = &state.db;
    db.execute_raw(db.get_database_backend().build(&stmt))
        .await?;
    Ok(())
}

/// The share of `credits` that `cents` of `amount` refunds (floor; all of
/// it once `cents` reaches `amount`).
fn share(credits: i64, cents: i64, amount: i64) -> i64 {
    if amount <= 0 || cents >= amount {
        return credits;
    }
    let cents = Ord::max(cents, 0);
    i64::try_from(i128::from(credits) * i128::from(cents) / i128::from(amount)).unwrap_or(credits)
}

/// The order's money came back (refund or lost dispute), `refunded_cents`
/// in all so far: takes back what the refunded share grew by since the
/// order last recorded, at most what its lot has left, and marks the order
/// `refunded`. `key` names this step for the ledger's idempotency;
/// `also` are further writes of the same step, in the same transaction.
pub async fn refunded(
    state: &AppState,
    order: order::Model,
    refunded_cents: i64,
    key: &str,
    also: Vec<SideWrite>,
) -> Result<()> {
    let refunded_cents = Ord::min(refunded_cents, Ord::max(order.amount_cents, 0));
    if refunded_cents <= order.refunded_cents {
        return Ok(());
    }
    if order.status != Status::Paid.as_str() && order.status != Status::Refunded.as_str() {
        // Not fulfilled yet: the provider retries, by then it is.
        return Err(Error::Unavailable(format!(
            "order {} is not paid yet; retry later",
            order.id
        )));
    }
    let (source_type, source_id) = lot_source(&order).ok_or_else(|| {
        // A subscription order whose payment has not been seen yet.
        Error::Unavailable(format!("order {} is not paid yet; retry later", order.id))
    })?;
    let lot = credit_lot::Entity::find()
        .filter(credit_lot::Column::OrgId.eq(order.org_id))
        .filter(credit_lot::Column::SourceType.eq(source_type.as_str()))
        .filter(credit_lot::Column::SourceId.eq(source_id.as_str()))
        .one(&state.db)
        .await?;
    // What the payment brought (a plan of no credits brought none).
    let credits = lot.map_or(0, |l| l.allocated_micros);
    let org = org_of(state, &order).await?;
    let before = share(credits, order.refunded_cents, order.amount_cents);
    let after = share(credits, refunded_cents, order.amount_cents);
    let mut stmt = update_order(&order.id, state.clock.now());
    stmt.value(order::Column::Status, Status::Refunded.as_str())
        .value(order::Column::RefundedCents, refunded_cents)
        .and_where(Expr::col(order::Column::RefundedCents).eq(order.refunded_cents));
    let mut writes = vec![side(&state.db, &stmt, Some(1))];
    writes.extend(also);
    if after > before {
        state
            .ledger
            .take_back(TakeBackInput {
                org,
                source_type,
                source_id,
                amount: after - before,
                key: format!("{key}:{}:{refunded_cents}", order.id),
                description: format!("Refund of order {}", order.id),
                then: writes,
            })
            .await?;
    } else {
        // No credits to take: the same writes, with the same guards.
        let txn = crate::db::begin_write(&state.db).await?;
        for w in writes {
            let done = txn.execute_raw(w.statement).await?;
            if w.expect_rows.is_some_and(|n| n != done.rows_affected()) {
                return Err(Error::Unavailable(format!(
                    "order {} changed meanwhile; retry",
                    order.id
                )));
            }
        }
        txn.commit().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn refund_shares_floor_and_end_at_the_whole() {
        assert_eq!(share(100, 0, 1999), 0);
        assert_eq!(share(100, 1000, 1999), 50);
        assert_eq!(share(100, 1999, 1999), 100);
        assert_eq!(share(100, 5000, 1999), 100);
        assert_eq!(share(i64::MAX, 1, 2), i64::MAX / 2);
        // Partial refunds add up to the whole, never more.
        let steps = [0, 700, 1300, 1999];
        let taken: i64 = steps
            .windows(2)
            .map(|w| share(100, w[1], 1999) - share(100, w[0], 1999))
            .sum();
        assert_eq!(taken, 100);
    }
}
