//! Coupons at checkout and at payment: the seam with the purchases.
//!
//! * **Checkout** ([`claim`]): inside the transaction that creates the
//!   order, the coupon's row is locked first, so concurrent checkouts of
//!   one coupon (on any replica) take turns. The coupon must be usable
//!   (see [`super::rule`]) counting its redemptions *and* the open orders
//!   that hold it: an order holds its coupon while it is `pending` and
//!   either younger than [`HOLD`] or waiting for a payment the provider
//!   has reported as started. So `max_redemptions` is never exceeded by
//!   checkouts that all pay: of ten racing checkouts on a coupon with
//!   three uses left, three open and seven get `INVALID_COUPON`. An order
//!   that fails, expires or outlives its hold gives its place back.
//! * **Payment** ([`redemption_writes`]): when the order's payment
//!   completes, the coupon is redeemed in the same transaction that marks
//!   the order paid: a `coupon_redemptions` row (unique per order, so a
//!   replayed webhook redeems nothing twice), written only while the
//!   coupon is still below its limit, and `redeemed_count` recounted from
//!   those rows. Then a `bonus_credits` coupon grants its credits as a
//!   `coupon` lot whose source is the order ([`grant_bonus`]), at most once
//!   whatever the replays, and only if the order did redeem it.

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    sea_query::{Expr, ExprTrait, Query, SimpleExpr, SubQueryStatement},
};

use super::{
    Kind,
    rule::{self, Terms},
};
use crate::{
    domain::MICROS_PER_CREDIT,
    entities::{coupon, coupon_redemption, order},
    error::{Error, Result},
    ledger::{GrantInput, LotKind, SideWrite},
    state::AppState,
};

/// How long an open order holds its coupon without a payment under way:
/// Stripe's default checkout lifetime.
pub const HOLD: TimeDelta = TimeDelta::hours(24);

/// The ledger source of a coupon's bonus credits (the id is the order's).
pub const BONUS_SOURCE: &str = "coupon";

/// Longest coupon code accepted at checkout.
const MAX_CODE: usize = 64;

/// A checkout's `coupon_code` (in `field`): `None` when absent or blank,
/// else the code as stored (upper-case). Any other code is looked up
/// later and is `INVALID_COUPON` when unknown.
pub fn code(field: &str, value: Option<&str>) -> Result<Option<String>> {
    match value.map(str::trim).filter(|c| !c.is_empty()) {
        None => Ok(None),
        Some(c) if c.chars().count() > MAX_CODE => Err(Error::invalid(
            field,
            format!("is longer than {MAX_CODE} characters"),
        )),
        Some(c) => Ok(Some(c.to_uppercase())),
    }
}

/// A coupon a checkout uses, and the price it leaves.
#[derive(Debug, Clone)]
pub struct Applied {
    pub coupon_id: String,
    pub code: String,
    pub kind: Kind,
    pub value: i64,
    /// What the provider is to charge.
    pub amount_cents: i64,
}

impl Applied {
    /// Whether the coupon lowers the price (rather than adding credits).
    pub fn is_discount(&self) -> bool {
        match self.kind {
            Kind::PercentOff | Kind::AmountOff => true,
            Kind::BonusCredits => false,
        }
    }
}

/// Takes `code` for an order of `amount_cents` being created in `txn`:
/// locks the coupon's row, then checks it against its redemptions and the
/// open orders holding it. The caller stores the coupon's id on the order
/// in the same transaction.
pub async fn claim(
    txn: &impl ConnectionTrait,
    code: &str,
    amount_cents: i64,
    now: DateTime<Utc>,
) -> Result<Applied> {
    let unknown = || Error::InvalidCoupon(format!("unknown coupon `{code}`"));
    let locked = coupon::Entity::update_many()
        .col_expr(
            coupon::Column::RedeemedCount,
            Expr::col(coupon::Column::RedeemedCount),
        )
        .filter(coupon::Column::Code.eq(code))
        .exec(txn)
        .await?;
    if locked.rows_affected == 0 {
        return Err(unknown());
    }
    let c = coupon::Entity::find()
        .filter(coupon::Column::Code.eq(code))
        .one(txn)
        .await?
        .ok_or_else(unknown)?;
    let held = order::Entity::find()
        .filter(order::Column::CouponId.eq(c.id.as_str()))
        .filter(order::Column::Status.eq("pending"))
        .filter(
            Condition::any()
                .add(order::Column::CreatedAt.gt(now - HOLD))
                .add(order::Column::ProviderPaymentId.is_not_null()),
        )
        .count(txn)
        .await?;
    let kind = Kind::parse(&c.kind)
        .map_err(|_| Error::internal(format!("coupon {} has kind {}", c.id, c.kind)))?;
    let terms = Terms {
        kind,
        value: c.value,
        active: c.active,
        expires_at: c.expires_at,
        max_redemptions: c.max_redemptions,
    };
    let taken = i64::from(c.redeemed_count).saturating_add(i64::try_from(held).unwrap_or(i64::MAX));
    let amount = rule::apply(&terms, taken, amount_cents, now)
        .map_err(|why| Error::InvalidCoupon(why.message(&c.code)))?;
    Ok(Applied {
        coupon_id: c.id,
        code: c.code,
        kind,
        value: c.value,
        amount_cents: amount,
    })
}

/// The writes that redeem the order's coupon (none without one), for the
/// transaction that marks the order paid: lock the coupon, add the
/// order's redemption unless it has one or the coupon is used up, recount.
pub fn redemption_writes(
    db: &impl ConnectionTrait,
    order: &order::Model,
    now: DateTime<Utc>,
) -> Vec<SideWrite> {
    let Some(coupon_id) = order.coupon_id.as_deref() else {
        return Vec::new();
    };
    let backend = db.get_database_backend();
    let write = |statement| SideWrite {
        statement,
        expect_rows: None,
    };
    let lock = Query::update()
        .table(coupon::Entity)
        .value(
            coupon::Column::RedeemedCount,
            Expr::col(coupon::Column::RedeemedCount),
        )
        .and_where(Expr::col(coupon::Column::Id).eq(coupon_id))
        .to_owned();
    let already = Query::select()
        .expr(Expr::val(1))
        .from(coupon_redemption::Entity)
        .and_where(Expr::col(coupon_redemption::Column::OrderId).eq(order.id.as_str()))
        .to_owned();
    let room = Query::select()
        .expr(Expr::val(1))
        .from(coupon::Entity)
        .and_where(Expr::col(coupon::Column::Id).eq(coupon_id))
        .cond_where(
            Condition::any()
                .add(Expr::col(coupon::Column::MaxRedemptions).is_null())
                .add(
                    Expr::col(coupon::Column::RedeemedCount)
                        .lt(Expr::col(coupon::Column::MaxRedemptions)),
                ),
        )
        .to_owned();
    let row = Query::select()
        .exprs([
            Expr::val(coupon_id),
            Expr::val(order.org_id),
            Expr::val(order.id.as_str()),
            Expr::val(now),
        ])
        .and_where(Expr::exists(already).not())
        .and_where(Expr::exists(room))
        .to_owned();
    let insert = Query::insert()
        .into_table(coupon_redemption::Entity)
        .columns([
            coupon_redemption::Column::CouponId,
            coupon_redemption::Column::OrgId,
            coupon_redemption::Column::OrderId,
            coupon_redemption::Column::CreatedAt,
        ])
        .select_from(row)
        .map(|i| i.to_owned());
    let count = Query::select()
        .expr(Expr::col(coupon_redemption::Column::Id).count())
        .from(coupon_redemption::Entity)
        .and_where(Expr::col(coupon_redemption::Column::CouponId).eq(coupon_id))
        .to_owned();
    let recount = Query::update()
        .table(coupon::Entity)
        .value(
            coupon::Column::RedeemedCount,
            SimpleExpr::SubQuery(None, Box::new(SubQueryStatement::SelectStatement(count))),
        )
        .and_where(Expr::col(coupon::Column::Id).eq(coupon_id))
        .to_owned();
    let mut writes = vec![write(backend.build(&lock))];
    match insert {
        Ok(i) => writes.push(write(backend.build(&i))),
        Err(e) => tracing::error!(error = %e, "coupon redemption statement"),
    }
    writes.push(write(backend.build(&recount)));
    writes
}

/// Grants a `bonus_credits` coupon's credits for `order` (paid and
/// redeemed) to `org`: a `coupon` lot expiring at `expires_at`, at most
/// once per order. Nothing for other coupons, or when the order's payment
/// came after the coupon was used up.
pub async fn grant_bonus(
    state: &AppState,
    order: &order::Model,
    org: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<()> {
    let Some(coupon_id) = order.coupon_id.as_deref() else {
        return Ok(());
    };
    let Some(c) = coupon::Entity::find_by_id(coupon_id).one(&state.db).await? else {
        return Err(Error::internal(format!(
            "order {} names a missing coupon",
            order.id
        )));
    };
    if c.kind != Kind::BonusCredits.as_str() {
        return Ok(());
    }
    let redeemed = coupon_redemption::Entity::find()
        .filter(coupon_redemption::Column::OrderId.eq(order.id.as_str()))
        .count(&state.db)
        .await?;
    if redeemed == 0 {
        tracing::warn!(order = %order.id, coupon = %c.code, "paid after the coupon was used up: no bonus");
        return Ok(());
    }
    state
        .ledger
        .grant(GrantInput {
            org: org.to_owned(),
            entry_kind: "coupon",
            lot_kind: LotKind::Coupon,
            amount: c.value.saturating_mul(MICROS_PER_CREDIT),
            expires_at,
            source_type: BONUS_SOURCE.into(),
            source_id: Some(order.id.clone()),
            description: format!("Coupon {} (order {})", c.code, order.id),
            then: Vec::new(),
        })
        .await?;
    Ok(())
}
