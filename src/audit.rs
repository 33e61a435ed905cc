//! The admin audit log: every admin write records who made it, when, what
//! it changed (the record before and after) and why, in the write's own
//! transaction, so no change goes unrecorded and no record describes a
//! change that did not happen.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde_json::{Value, json};

use crate::{entities::admin_audit, error::Result};

/// One admin change, ready to be written next to it.
pub struct Change<'a> {
    /// The admin's token `sub`.
    pub actor: &'a str,
    /// What kind of change: `plan.create`, `checkin_config.update`, …
    pub action: &'a str,
    /// The organization it concerns, if one.
    pub target_org: Option<&'a str>,
    /// What it is about: a plan id, a coupon code, …
    pub target: &'a str,
    pub reason: &'a str,
    /// The record before (null for a creation) and after.
    pub before: Value,
    pub after: Value,
}

impl<'a> Change<'a> {
    /// A change to the catalog (plans, packs, rates, coupons, the check-in
    /// configuration): no organization, no reason.
    pub fn catalog(
        actor: &'a str,
        action: &'a str,
        target: &'a str,
        before: Value,
        after: Value,
    ) -> Self {
        Self {
            actor,
            action,
            target_org: None,
            target,
            reason: "",
            before,
            after,
        }
    }
}

/// Writes `change` on `db` (the transaction of the change itself).
pub async fn record(
    db: &impl ConnectionTrait,
    change: Change<'_>,
    now: DateTime<Utc>,
) -> Result<()> {
    admin_audit::Entity::insert(admin_audit::ActiveModel {
        actor_sub: Set(change.actor.into()),
        action: Set(change.action.into()),
        target_org: Set(change.target_org.map(str::to_owned)),
        reason: Set(change.reason.into()),
        details: Set(json!({
            "target": change.target,
            "before": change.before,
            "after": change.after,
        })
        .to_string()),
        created_at: Set(now),
        ..Default::default()
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Audit entries, newest first, optionally of one organization and of one
/// action; with the total that matches.
pub async fn list(
    db: &impl ConnectionTrait,
    org: Option<&str>,
    action: Option<&str>,
    limit: u64,
    offset: u64,
) -> Result<(Vec<admin_audit::Model>, u64)> {
    let mut query = admin_audit::Entity::find();
    if let Some(org) = org {
        query = query.filter(admin_audit::Column::TargetOrg.eq(org));
    }
    if let Some(action) = action {
        query = query.filter(admin_audit::Column::Action.eq(action));
    }
    let total = query.clone().count(db).await?;
    let rows = query
        .order_by_desc(admin_audit::Column::Id)
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?;
    Ok((rows, total))
}
