//! The usage rates, held in memory for the hot path and reloaded from the
//! database periodically. Cost = ceil(quantity × per-unit / unit size).

use std::collections::HashMap;

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

use crate::{
    domain::{Meter, meter::cost_micros},
    entities::rate,
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy)]
struct Price {
    per_unit_micros: i64,
    unit_size: i64,
}

/// Active rates by (meter, model); model `""` is the meter's default.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    prices: HashMap<(Meter, String), Price>,
}

impl Rates {
    pub async fn load(db: &impl ConnectionTrait) -> Result<Self> {
        let rows = rate::Entity::find()
            .filter(rate::Column::Active.eq(true))
            .all(db)
            .await?;
        let mut prices = HashMap::new();
        for row in rows {
            let Ok(meter) = row.meter.parse::<Meter>() else {
                continue;
            };
            prices.insert(
                (meter, row.model),
                Price {
                    per_unit_micros: row.credits_per_unit_micros,
                    unit_size: row.unit_size,
                },
            );
        }
        Ok(Self { prices })
    }

    /// The cost in micro-credits of `quantity` base units of `meter` on
    /// `model` (falling back to the meter's default rate).
    pub fn cost(&self, meter: Meter, model: Option<&str>, quantity: i64) -> Result<i64> {
        let price = model
            .and_then(|m| self.prices.get(&(meter, m.to_owned())))
            .or_else(|| self.prices.get(&(meter, String::new())))
            .ok_or_else(|| {
                Error::invalid(
                    "meter",
                    format!("no rate is configured for meter {}", meter.as_str()),
                )
            })?;
        cost_micros(quantity, price.per_unit_micros, price.unit_size)
            .ok_or_else(|| Error::invalid("quantity", "the cost of this quantity is too large"))
    }
}
