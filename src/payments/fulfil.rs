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

use super::orders::Status;
use crate::{
    domain::MICROS_PER_CREDIT,
    entities::{order, organization, pack},
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

async fn bought(state: &AppState, order: order::Model) -> Result<Bought> {
    let org = organization::Entity::find_by_id(order.org_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal(format!("order {} has no organization", order.id)))?;
    let pack_id = order
        .pack_id
        .clone()
        .ok_or(Error::NotImplemented("subscription orders"))?;
    let pack = pack::Entity::find_by_id(pack_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal(format!("order {} names a missing pack", order.id)))?;
    Ok(Bought {
        order,
        org: org.external_id,
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
    state
        .ledger
        .settle(SettleInput {
            org: b.org,
            entry_kind: "purchase",
            lot_kind: LotKind::TopUp,
            amount: b.credits_micros,
            expires_at: Some(now + TimeDelta::days(b.expiry_days)),
            source_type: ORDER_SOURCE.into(),
            source_id: b.order.id.clone(),
            description: format!("Credit pack (order {})", b.order.id),
            then: vec![side(&state.db, &stmt, None)],
        })
        .await?;
    Ok(())
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
    let b = bought(state, order).await?;
    let mut stmt = update_order(&b.order.id, state.clock.now());
    stmt.value(order::Column::Status, Status::Failed.as_str())
        .and_where(Expr::col(order::Column::Status).eq(Status::Pending.as_str()));
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
/// `refunded`. `key` names this step for the ledger's idempotency.
pub async fn refunded(
    state: &AppState,
    order: order::Model,
    refunded_cents: i64,
    key: &str,
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
    let b = bought(state, order).await?;
    let before = share(
        b.credits_micros,
        b.order.refunded_cents,
        b.order.amount_cents,
    );
    let after = share(b.credits_micros, refunded_cents, b.order.amount_cents);
    let mut stmt = update_order(&b.order.id, state.clock.now());
    stmt.value(order::Column::Status, Status::Refunded.as_str())
        .value(order::Column::RefundedCents, refunded_cents)
        .and_where(Expr::col(order::Column::RefundedCents).eq(b.order.refunded_cents));
    let guarded = side(&state.db, &stmt, Some(1));
    if after > before {
        state
            .ledger
            .take_back(TakeBackInput {
                org: b.org,
                source_type: ORDER_SOURCE.into(),
                source_id: b.order.id.clone(),
                amount: after - before,
                key: format!("{key}:{}:{refunded_cents}", b.order.id),
                description: format!("Refund of order {}", b.order.id),
                then: vec![guarded],
            })
            .await?;
    } else {
        let db = &state.db;
        db.execute_raw(guarded.statement).await?;
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
