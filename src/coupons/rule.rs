//! When a coupon may be used and what it takes off a price: pure rules.
//!
//! A coupon is usable while it is active, before its `expires_at`, and
//! while the checkouts that hold it plus the payments that redeemed it stay
//! below `max_redemptions` (no limit when unset). A discount never takes a
//! price below nothing, and a coupon that would leave nothing to pay is
//! refused: no provider takes a zero-amount payment for a one-time sale.

use chrono::{DateTime, Utc};

use super::Kind;

/// Why a coupon cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Inactive,
    Expired,
    UsedUp,
    /// The discount leaves nothing to pay.
    Free,
}

impl Unusable {
    pub fn message(self, code: &str) -> String {
        match self {
            Self::Inactive => format!("coupon `{code}` is not active"),
            Self::Expired => format!("coupon `{code}` has expired"),
            Self::UsedUp => format!("coupon `{code}` has been used up"),
            Self::Free => format!("coupon `{code}` would leave nothing to pay"),
        }
    }
}

/// A coupon's terms, as the rules need them.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    pub kind: Kind,
    pub value: i64,
    pub active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub max_redemptions: Option<i32>,
}

/// Whether a coupon whose uses so far (redeemed plus held by open
/// checkouts) are `taken` may be used at `now` on a price of
/// `amount_cents`; if so, the price it leaves.
pub fn apply(
    t: &Terms,
    taken: i64,
    amount_cents: i64,
    now: DateTime<Utc>,
) -> Result<i64, Unusable> {
    if !t.active {
        return Err(Unusable::Inactive);
    }
    if t.expires_at.is_some_and(|e| e <= now) {
        return Err(Unusable::Expired);
    }
    if t.max_redemptions.is_some_and(|m| taken >= i64::from(m)) {
        return Err(Unusable::UsedUp);
    }
    let price = price_after(t.kind, t.value, amount_cents);
    if price <= 0 && amount_cents > 0 {
        return Err(Unusable::Free);
    }
    Ok(price)
}

/// `amount_cents` after a coupon of `kind` and `value`: percent off rounds
/// the discount down to the cent (the buyer never pays less than the
/// percentage says), amount off is capped at the price, bonus credits
/// leave the price as it is.
pub fn price_after(kind: Kind, value: i64, amount_cents: i64) -> i64 {
    let amount = amount_cents.max(0);
    match kind {
        Kind::PercentOff => {
            let off = i128::from(amount) * i128::from(value.clamp(0, 100)) / 100;
            amount - i64::try_from(off).unwrap_or(amount)
        }
        Kind::AmountOff => amount - value.clamp(0, amount),
        Kind::BonusCredits => amount,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(kind: Kind, value: i64) -> Terms {
        Terms {
            kind,
            value,
            active: true,
            expires_at: None,
            max_redemptions: Some(3),
        }
    }

    #[test]
    fn discounts_round_in_the_sellers_favour_and_stop_at_the_price() {
        assert_eq!(price_after(Kind::PercentOff, 10, 1999), 1800);
        assert_eq!(price_after(Kind::PercentOff, 15, 999), 850);
        assert_eq!(price_after(Kind::PercentOff, 100, 1999), 0);
        assert_eq!(price_after(Kind::AmountOff, 500, 1999), 1499);
        assert_eq!(price_after(Kind::AmountOff, 5000, 1999), 0);
        assert_eq!(price_after(Kind::BonusCredits, 50, 1999), 1999);
        assert_eq!(
            price_after(Kind::PercentOff, 50, i64::MAX),
            i64::MAX / 2 + 1
        );
    }

    #[test]
    fn a_coupon_is_usable_while_active_unexpired_and_not_used_up() {
        let now = Utc::now();
        let t = terms(Kind::PercentOff, 10);
        assert_eq!(apply(&t, 0, 1999, now), Ok(1800));
        assert_eq!(apply(&t, 2, 1999, now), Ok(1800));
        assert_eq!(apply(&t, 3, 1999, now), Err(Unusable::UsedUp));
        let unlimited = Terms {
            max_redemptions: None,
            ..t
        };
        assert_eq!(apply(&unlimited, 1_000_000, 1999, now), Ok(1800));
        let off = Terms { active: false, ..t };
        assert_eq!(apply(&off, 0, 1999, now), Err(Unusable::Inactive));
        let old = Terms {
            expires_at: Some(now),
            ..t
        };
        assert_eq!(apply(&old, 0, 1999, now), Err(Unusable::Expired));
        let all = terms(Kind::AmountOff, 5000);
        assert_eq!(apply(&all, 0, 1999, now), Err(Unusable::Free));
        assert_eq!(
            apply(&terms(Kind::BonusCredits, 50), 0, 1999, now),
            Ok(1999)
        );
    }
}
