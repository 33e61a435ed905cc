//! Subscriptions: which plan an organization is on.

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

use crate::{
    entities::{plan, subscription},
    error::Result,
    ledger::reads::ACTIVE_STATUSES,
};

/// The free plan every organization without a paid one is on.
pub const FREE_PLAN_CODE: &str = "SUB_BASE";

/// The organization's active paid subscription and its plan, if any.
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
