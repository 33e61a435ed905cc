//! The catalog: subscription plans, credit packs and usage rates, and
//! which plan an organization is on.
//!
//! Reads for the public listings, the one rule for an organization's plan
//! in force ([`active_subscription`], [`effective_plan`]), and the default
//! catalog seeded into a database that has no plans yet.

pub mod packs;
pub mod plans;
pub mod rates;
mod seed;

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

pub use seed::seed_default_catalog;

use crate::{
    entities::{pack, plan, rate, subscription},
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

/// The free plan every organization without a paid one is on.
pub const FREE_PLAN_CODE: &str = "SUB_BASE";

/// Subscription statuses in which the plan is in force (a `past_due`
/// subscription keeps its plan while the provider retries the payment).
pub const ACTIVE_STATUSES: &[&str] = &["active", "trialing", "past_due"];

/// The organization's subscription in force and its plan, if any: the
/// newest one in an active status whose current period has not ended.
pub async fn active_subscription(
    db: &impl ConnectionTrait,
    org_id: i64,
    now: DateTime<Utc>,
) -> Result<Option<(subscription::Model, plan::Model)>> {
    let subs = subscription::Entity::find()
        .filter(subscription::Column::OrgId.eq(org_id))
        .filter(subscription::Column::Status.is_in(ACTIVE_STATUSES.iter().copied()))
        .order_by_desc(subscription::Column::CreatedAt)
        .all(db)
        .await?;
    for sub in subs {
        if sub.current_period_end.is_some_and(|end| end <= now) {
            continue;
        }
        if let Some(plan) = plan::Entity::find_by_id(sub.plan_id.clone())
            .one(db)
            .await?
        {
            return Ok(Some((sub, plan)));
        }
    }
    Ok(None)
}

/// The plan an organization is on: its subscription's, else the free plan.
pub async fn effective_plan(
    db: &impl ConnectionTrait,
    org_id: Option<i64>,
    now: DateTime<Utc>,
) -> Result<(Option<subscription::Model>, Option<plan::Model>)> {
    if let Some(org_id) = org_id
        && let Some((sub, plan)) = active_subscription(db, org_id, now).await?
    {
        return Ok((Some(sub), Some(plan)));
    }
    let free = plan::Entity::find()
        .filter(plan::Column::Code.eq(FREE_PLAN_CODE))
        .one(db)
        .await?;
    Ok((None, free))
}
