//! The catalog: subscription plans, credit packs and usage rates.
//!
//! Reads for the public listings, and the default catalog (CONTRACT §7)
//! seeded into a database that has no plans yet.

mod seed;

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

pub use seed::seed_default_catalog;

use crate::{
    entities::{pack, plan, rate},
    error::Result,
};

/// Active packs, in display order.
pub async fn list_packs(db: &impl ConnectionTrait) -> Result<Vec<pack::Model>> {
    Ok(pack::Entity::find()
        .filter(pack::Column::Active.eq(true))
        .order_by_asc(pack::Column::SortOrder)
        .order_by_asc(pack::Column::Id)
        .all(db)
        .await?)
}

/// Active rates: per meter, the default rate first, then per-model rates.
pub async fn list_rates(db: &impl ConnectionTrait) -> Result<Vec<rate::Model>> {
    Ok(rate::Entity::find()
        .filter(rate::Column::Active.eq(true))
        .order_by_asc(rate::Column::Meter)
        .order_by_asc(rate::Column::Model)
        .all(db)
        .await?)
}

/// Plans in tier order; inactive ones only when asked (admin).
pub async fn list_plans(
    db: &impl ConnectionTrait,
    include_inactive: bool,
) -> Result<Vec<plan::Model>> {
    let mut query = plan::Entity::find();
    if !include_inactive {
        query = query.filter(plan::Column::Active.eq(true));
    }
    Ok(query
        .order_by_asc(plan::Column::Tier)
        .order_by_asc(plan::Column::SortOrder)
        .order_by_asc(plan::Column::Id)
        .all(db)
        .await?)
}

/// The features list of a plan (stored as a JSON array of strings).
pub fn plan_features(plan: &plan::Model) -> Vec<String> {
    plan.features
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
