//! Pack administration: create and change credit packs, each field
//! validated and named in its error, each write audited in its own
//! transaction. Codes follow the plans' rule (stored upper-case, unique
//! whatever the case: `409 PACK_CODE_TAKEN`). An inactive pack leaves the
//! public listing and cannot be bought; orders already made keep it.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection, EntityTrait, QueryOrder};
use serde_json::{Value, json};

use super::plans::{MAX_CENTS, MAX_CREDITS, currency, provider_id, text, within};
use crate::{
    audit,
    domain::catalog_code,
    entities::pack,
    error::{Error, Result},
};

/// Largest per-cycle purchase limit and lot lifetime (days).
const MAX_LIMIT: i64 = 1000;
const MAX_EXPIRY_DAYS: i64 = 3650;

/// Pack fields as given: `None` is "not given" (a creation takes the
/// default, an update leaves the field as it is); an empty provider id
/// clears it.
#[derive(Debug, Clone, Default)]
pub struct PackInput {
    pub code: Option<String>,
    pub name: Option<String>,
    pub credits: Option<i64>,
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    pub limit_per_cycle: Option<i32>,
    pub lot_expiry_days: Option<i32>,
    pub active: Option<bool>,
    pub stripe_price_id: Option<String>,
    pub creem_product_id: Option<String>,
}

fn apply(row: &mut pack::ActiveModel, input: &PackInput) -> Result<()> {
    if let Some(v) = &input.code {
        row.code = Set(catalog_code("code", v)?);
    }
    if let Some(v) = &input.name {
        row.name = Set(text("name", v, 1, 255)?);
    }
    if let Some(v) = input.credits {
        if v < 1 {
            return Err(Error::invalid("credits", "must be at least 1"));
        }
        row.credits = Set(within("credits", v, MAX_CREDITS)?);
    }
    if let Some(v) = input.price_cents {
        row.price_cents = Set(within("price_cents", v, MAX_CENTS)?);
    }
    if let Some(v) = &input.currency {
        row.currency = Set(currency(v)?);
    }
    if let Some(v) = input.limit_per_cycle {
        row.limit_per_cycle = Set(within("limit_per_cycle", i64::from(v), MAX_LIMIT)? as i32);
    }
    if let Some(v) = input.lot_expiry_days {
        if v < 1 {
            return Err(Error::invalid("lot_expiry_days", "must be at least 1"));
        }
        row.lot_expiry_days = Set(Some(
            within("lot_expiry_days", i64::from(v), MAX_EXPIRY_DAYS)? as i32,
        ));
    }
    if let Some(v) = input.active {
        row.active = Set(v);
    }
    if let Some(v) = &input.stripe_price_id {
        row.stripe_price_id = Set(provider_id("stripe_price_id", v)?);
    }
    if let Some(v) = &input.creem_product_id {
        row.creem_product_id = Set(provider_id("creem_product_id", v)?);
    }
    Ok(())
}

fn snapshot(p: &pack::Model) -> Value {
    json!({
        "id": p.id, "code": p.code, "name": p.name, "credits": p.credits,
        "price_cents": p.price_cents, "currency": p.currency, "active": p.active,
        "limit_per_cycle": p.limit_per_cycle, "lot_expiry_days": p.lot_expiry_days,
        "stripe_price_id": p.stripe_price_id, "creem_product_id": p.creem_product_id,
    })
}

/// Every pack, inactive included, in listing order.
pub async fn list_all(db: &DatabaseConnection) -> Result<Vec<pack::Model>> {
    Ok(pack::Entity::find()
        .order_by_asc(pack::Column::SortOrder)
        .order_by_asc(pack::Column::Id)
        .all(db)
        .await?)
}

/// Creates a pack: `code`, `name` and `credits` required.
pub async fn create(
    db: &DatabaseConnection,
    actor: &str,
    input: &PackInput,
    now: DateTime<Utc>,
) -> Result<pack::Model> {
    for (given, field) in [
        (input.code.is_some(), "code"),
        (input.name.is_some(), "name"),
        (input.credits.is_some(), "credits"),
    ] {
        if !given {
            return Err(Error::invalid(field, "is required"));
        }
    }
    let mut row = pack::ActiveModel {
        id: Set(format!("pack-{}", uuid::Uuid::now_v7())),
        price_cents: Set(0),
        currency: Set("USD".into()),
        active: Set(true),
        limit_per_cycle: Set(3),
        lot_expiry_days: Set(None),
        stripe_price_id: Set(None),
        creem_product_id: Set(None),
        sort_order: Set(100),
        created_at: Set(now),
        ..Default::default()
    };
    apply(&mut row, input)?;
    let txn = crate::db::begin_write(db).await?;
    let created = row
        .insert(&txn)
        .await
        .map_err(|e| Error::unique_or(e, Error::PackCodeTaken))?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "pack.create",
            &created.id,
            Value::Null,
            snapshot(&created),
        ),
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(created)
}

/// Changes the given fields of pack `id` (`404 PACK_NOT_FOUND`).
pub async fn update(
    db: &DatabaseConnection,
    actor: &str,
    id: &str,
    input: &PackInput,
    now: DateTime<Utc>,
) -> Result<pack::Model> {
    let txn = crate::db::begin_write(db).await?;
    let Some(before) = pack::Entity::find_by_id(id).one(&txn).await? else {
        return Err(Error::PackNotFound);
    };
    let mut row: pack::ActiveModel = before.clone().into();
    apply(&mut row, input)?;
    let after = row
        .update(&txn)
        .await
        .map_err(|e| Error::unique_or(e, Error::PackCodeTaken))?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "pack.update",
            id,
            snapshot(&before),
            snapshot(&after),
        ),
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(after)
}
