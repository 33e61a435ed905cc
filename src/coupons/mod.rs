//! Coupons: their administration (this module), when one may be used and
//! what it takes off ([`rule`]), and their use at checkout and redemption
//! at payment ([`redeem`]).
//!
//! A coupon is one of three kinds: `percent_off` (value 1–100, percent of
//! the price), `amount_off` (value in cents off the price) or
//! `bonus_credits` (value in whole credits granted with the payment). Codes
//! are letters, digits, `_` and `-`, stored upper-case, so they are unique
//! whatever the case they are typed in (`409 COUPON_CODE_TAKEN`, the unique
//! index deciding when two creations race). An update switches a coupon on
//! or off or changes its limit or expiry, never its code, kind or value.
//! Every write is audited in its own transaction.

pub mod redeem;
pub mod rule;

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection, EntityTrait, QueryOrder};
use serde_json::{Value, json};

use crate::{
    audit,
    domain::catalog_code,
    entities::coupon,
    error::{Error, Result},
};

/// Largest `amount_off` (cents) and `bonus_credits` (credits) value.
pub const MAX_VALUE: i64 = 1_000_000_000_000;

/// What a coupon does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PercentOff,
    AmountOff,
    BonusCredits,
}

impl Kind {
    pub const ALL: [Self; 3] = [Self::PercentOff, Self::AmountOff, Self::BonusCredits];

    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "percent_off" => Ok(Self::PercentOff),
            "amount_off" => Ok(Self::AmountOff),
            "bonus_credits" => Ok(Self::BonusCredits),
            other => Err(Error::invalid(
                "kind",
                format!("`{other}` is not one of percent_off, amount_off, bonus_credits"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PercentOff => "percent_off",
            Self::AmountOff => "amount_off",
            Self::BonusCredits => "bonus_credits",
        }
    }

    /// The values a coupon of this kind may have.
    fn bounds(self) -> (i64, i64) {
        match self {
            Self::PercentOff => (1, 100),
            Self::AmountOff | Self::BonusCredits => (1, MAX_VALUE),
        }
    }
}

/// A coupon to create.
#[derive(Debug, Clone)]
pub struct NewCoupon {
    pub code: String,
    pub kind: String,
    pub value: i64,
    pub max_redemptions: Option<i32>,
    pub expires_at: Option<DateTime<Utc>>,
    pub active: Option<bool>,
}

fn validated(c: &NewCoupon, now: DateTime<Utc>) -> Result<(String, Kind)> {
    let code = catalog_code("code", &c.code)?;
    let kind = Kind::parse(c.kind.trim())?;
    let (min, max) = kind.bounds();
    if !(min..=max).contains(&c.value) {
        return Err(Error::invalid(
            "value",
            format!("a {} coupon's value is {min} to {max}", kind.as_str()),
        ));
    }
    limits(c.max_redemptions, c.expires_at, now)?;
    Ok((code, kind))
}

/// A limit and an expiry, on creation and on update alike.
fn limits(
    max_redemptions: Option<i32>,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<()> {
    if max_redemptions.is_some_and(|n| n < 1) {
        return Err(Error::invalid("max_redemptions", "must be at least 1"));
    }
    if expires_at.is_some_and(|t| t <= now) {
        return Err(Error::invalid("expires_at", "must be in the future"));
    }
    Ok(())
}

fn snapshot(c: &coupon::Model) -> Value {
    json!({
        "id": c.id, "code": c.code, "kind": c.kind, "value": c.value,
        "max_redemptions": c.max_redemptions, "expires_at": c.expires_at, "active": c.active,
    })
}

/// Creates a coupon, audited.
pub async fn create(
    db: &DatabaseConnection,
    actor: &str,
    new: &NewCoupon,
    now: DateTime<Utc>,
) -> Result<coupon::Model> {
    let (code, kind) = validated(new, now)?;
    let txn = crate::db::begin_write(db).await?;
    let created = coupon::ActiveModel {
        id: Set(format!("coupon-{}", uuid::Uuid::now_v7())),
        code: Set(code),
        kind: Set(kind.as_str().into()),
        value: Set(new.value),
        max_redemptions: Set(new.max_redemptions),
        redeemed_count: Set(0),
        expires_at: Set(new.expires_at),
        active: Set(new.active.unwrap_or(true)),
        created_at: Set(now),
    }
    .insert(&txn)
    .await
    .map_err(|e| Error::unique_or(e, Error::CouponCodeTaken))?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "coupon.create",
            &created.code,
            Value::Null,
            snapshot(&created),
        ),
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(created)
}

/// What an update may change: whether the coupon is usable, its limit and
/// its expiry. Code, kind and value stay, so that every order priced with
/// the coupon is redeemed on the terms it was priced with.
#[derive(Debug, Clone, Default)]
pub struct CouponChange {
    pub active: Option<bool>,
    pub max_redemptions: Option<i32>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Changes coupon `id` (`404 COUPON_NOT_FOUND`), audited. A limit below
/// the redemptions already made leaves the coupon used up; redemptions
/// already made are never undone.
pub async fn update(
    db: &DatabaseConnection,
    actor: &str,
    id: &str,
    change: &CouponChange,
    now: DateTime<Utc>,
) -> Result<coupon::Model> {
    limits(change.max_redemptions, change.expires_at, now)?;
    let txn = crate::db::begin_write(db).await?;
    let Some(before) = coupon::Entity::find_by_id(id).one(&txn).await? else {
        return Err(Error::CouponNotFound);
    };
    let mut row: coupon::ActiveModel = before.clone().into();
    if let Some(v) = change.active {
        row.active = Set(v);
    }
    if let Some(v) = change.max_redemptions {
        row.max_redemptions = Set(Some(v));
    }
    if let Some(v) = change.expires_at {
        row.expires_at = Set(Some(v));
    }
    let after = row.update(&txn).await?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "coupon.update",
            &after.code,
            snapshot(&before),
            snapshot(&after),
        ),
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(after)
}

/// Every coupon, newest first.
pub async fn list(db: &DatabaseConnection) -> Result<Vec<coupon::Model>> {
    Ok(coupon::Entity::find()
        .order_by_desc(coupon::Column::CreatedAt)
        .order_by_desc(coupon::Column::Id)
        .all(db)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(kind: &str, value: i64) -> NewCoupon {
        NewCoupon {
            code: "spring-10".into(),
            kind: kind.into(),
            value,
            max_redemptions: None,
            expires_at: None,
            active: None,
        }
    }

    #[test]
    fn values_are_bounded_by_kind() {
        let now = Utc::now();
        let field = |c: NewCoupon| match validated(&c, now) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            validated(&new("percent_off", 100), now).expect("valid"),
            ("SPRING-10".into(), Kind::PercentOff)
        );
        assert_eq!(field(new("percent_off", 101)), "value");
        assert_eq!(field(new("percent_off", 0)), "value");
        assert_eq!(field(new("amount_off", MAX_VALUE + 1)), "value");
        assert_eq!(field(new("free_lunch", 1)), "kind");
        let mut c = new("bonus_credits", 5);
        c.max_redemptions = Some(0);
        assert_eq!(field(c), "max_redemptions");
        let mut c = new("bonus_credits", 5);
        c.expires_at = Some(now);
        assert_eq!(field(c), "expires_at");
        let mut c = new("bonus_credits", 5);
        c.code = "two words".into();
        assert_eq!(field(c), "code");
    }
}
