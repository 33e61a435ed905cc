//! Orders: reads within one organization (its row id first in every
//! filter, so another organization's order is simply not found), and the
//! status transitions payments make.

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};

use crate::{
    entities::order,
    error::{Error, Result},
};

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Paid,
    Failed,
    Expired,
    Refunded,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Refunded => "refunded",
        }
    }
}

/// The organization's orders, newest first, and how many it has.
pub async fn list(
    db: &impl ConnectionTrait,
    org_id: i64,
    limit: u64,
    offset: u64,
) -> Result<(Vec<order::Model>, u64)> {
    let query = order::Entity::find().filter(order::Column::OrgId.eq(org_id));
    let total = query.clone().count(db).await?;
    let rows = query
        .order_by_desc(order::Column::CreatedAt)
        .order_by_desc(order::Column::Id)
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?;
    Ok((rows, total))
}

/// One order of the organization; ORDER_NOT_FOUND for any other.
pub async fn get(db: &impl ConnectionTrait, org_id: i64, id: &str) -> Result<order::Model> {
    order::Entity::find()
        .filter(order::Column::OrgId.eq(org_id))
        .filter(order::Column::Id.eq(id))
        .one(db)
        .await?
        .ok_or(Error::OrderNotFound)
}
