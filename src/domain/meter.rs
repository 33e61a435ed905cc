//! Meters (what usage is measured in) and the rate arithmetic.
//!
//! A rate says how many micro-credits one *unit* costs, where the unit is
//! 1 GB (10^9 bytes) for `storage_egress` and 1M tokens for `ai_tokens`.
//! Cost = ceil(quantity × credits_per_unit_micros / unit_size), in integers.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    StorageEgress,
    AiTokens,
}

impl Meter {
    pub const ALL: [Meter; 2] = [Meter::StorageEgress, Meter::AiTokens];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StorageEgress => "storage_egress",
            Self::AiTokens => "ai_tokens",
        }
    }

    /// Base units (bytes, tokens) in one priced unit.
    pub fn unit_size(self) -> i64 {
        match self {
            Self::StorageEgress => 1_000_000_000,
            Self::AiTokens => 1_000_000,
        }
    }

    /// The priced unit's name.
    pub fn unit(self) -> &'static str {
        match self {
            Self::StorageEgress => "GB",
            Self::AiTokens => "1M tokens",
        }
    }

    /// The ledger transaction type that usage of this meter is booked as.
    pub fn transaction_type(self) -> &'static str {
        match self {
            Self::StorageEgress => "storage_egress",
            Self::AiTokens => "ai_usage",
        }
    }
}

impl FromStr for Meter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "storage_egress" => Ok(Self::StorageEgress),
            "ai_tokens" => Ok(Self::AiTokens),
            other => Err(format!(
                "unknown meter `{other}` (storage_egress, ai_tokens)"
            )),
        }
    }
}

/// ceil(quantity × per_unit_micros / unit_size), or `None` when a negative
/// input is given or the cost does not fit in `i64`.
pub fn cost_micros(quantity: i64, per_unit_micros: i64, unit_size: i64) -> Option<i64> {
    if quantity < 0 || per_unit_micros < 0 || unit_size <= 0 {
        return None;
    }
    let product = u128::from(quantity.unsigned_abs()) * u128::from(per_unit_micros.unsigned_abs());
    let unit = u128::from(unit_size.unsigned_abs());
    i64::try_from(product.div_ceil(unit)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_exactly() {
        // 2 credits per GB: 1 byte costs ceil(2e6 / 1e9) = 1 micro.
        assert_eq!(cost_micros(1, 2_000_000, 1_000_000_000), Some(1));
        assert_eq!(
            cost_micros(1_000_000_000, 2_000_000, 1_000_000_000),
            Some(2_000_000)
        );
        assert_eq!(
            cost_micros(1_500_000, 3_000_000, 1_000_000),
            Some(4_500_000)
        );
        assert_eq!(cost_micros(0, 3_000_000, 1_000_000), Some(0));
        assert_eq!(cost_micros(i64::MAX, i64::MAX, 1), None);
        assert_eq!(cost_micros(-1, 1, 1), None);
    }

    #[test]
    fn meters_parse() {
        assert_eq!("ai_tokens".parse(), Ok(Meter::AiTokens));
        assert!("bandwidth".parse::<Meter>().is_err());
    }
}
