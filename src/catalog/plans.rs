//! Plan administration: create and change plans, each field validated and
//! named in its error, each write audited in its own transaction.
//!
//! Codes are letters, digits, `_` and `-`, stored upper-case, so they are
//! unique whatever the case they are typed in (`409 PLAN_CODE_TAKEN`, also
//! when two creations race: the database's unique index decides). An
//! inactive plan leaves the public listing but stays in force for the
//! subscriptions that have it.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection, EntityTrait};
use serde_json::{Value, json};

use crate::{
    audit,
    domain::catalog_code,
    entities::plan,
    error::{Error, Result},
};

/// Largest price, in cents, and largest credits a plan may include.
pub const MAX_CENTS: i64 = 1_000_000_000_000;
pub const MAX_CREDITS: i64 = 1_000_000_000_000;
const MAX_TIER: i32 = 100;
const MAX_FEATURES: usize = 50;
const MAX_NAME: usize = 255;
const MAX_DESCRIPTION: usize = 1000;
const MAX_PROVIDER_ID: usize = 255;

/// Plan fields as given: `None` is "not given" (a creation takes the
/// default, an update leaves the field as it is). For the provider ids,
/// `Some("")` clears the id.
#[derive(Debug, Clone, Default)]
pub struct PlanInput {
    pub code: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub tier: Option<i32>,
    pub price_monthly_cents: Option<i64>,
    pub price_yearly_cents: Option<i64>,
    pub currency: Option<String>,
    pub credits_included: Option<i64>,
    pub features: Option<Vec<String>>,
    pub active: Option<bool>,
    pub stripe_price_monthly: Option<String>,
    pub stripe_price_yearly: Option<String>,
    pub creem_product_id: Option<String>,
}

pub(super) fn text(field: &str, value: &str, min: usize, max: usize) -> Result<String> {
    let v = value.trim();
    let n = v.chars().count();
    if n < min || n > max {
        return Err(Error::invalid(
            field,
            if min == 0 {
                format!("must be at most {max} characters")
            } else {
                format!("must be {min} to {max} characters")
            },
        ));
    }
    Ok(v.to_owned())
}

pub(super) fn within(field: &str, value: i64, max: i64) -> Result<i64> {
    if !(0..=max).contains(&value) {
        return Err(Error::invalid(
            field,
            format!("must be between 0 and {max}"),
        ));
    }
    Ok(value)
}

pub(super) fn currency(value: &str) -> Result<String> {
    let v = value.trim();
    if v.len() != 3 || !v.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(Error::invalid(
            "currency",
            "must be a three-letter ISO 4217 code",
        ));
    }
    Ok(v.to_ascii_uppercase())
}

fn features(values: &[String]) -> Result<Value> {
    if values.len() > MAX_FEATURES {
        return Err(Error::invalid(
            "features",
            format!("at most {MAX_FEATURES} features"),
        ));
    }
    let mut out = Vec::with_capacity(values.len());
    for f in values {
        out.push(text("features", f, 1, MAX_NAME)?);
    }
    Ok(json!(out))
}

pub(super) fn provider_id(field: &str, value: &str) -> Result<Option<String>> {
    let v = text(field, value, 0, MAX_PROVIDER_ID)?;
    Ok((!v.is_empty()).then_some(v))
}

/// Applies every given field of `input` to `row`, validating each.
fn apply(row: &mut plan::ActiveModel, input: &PlanInput) -> Result<()> {
    if let Some(v) = &input.code {
        row.code = Set(catalog_code("code", v)?);
    }
    if let Some(v) = &input.name {
        row.name = Set(text("name", v, 1, MAX_NAME)?);
    }
    if let Some(v) = &input.description {
        row.description = Set(text("description", v, 0, MAX_DESCRIPTION)?);
    }
    if let Some(v) = input.tier {
        row.tier = Set(within("tier", i64::from(v), i64::from(MAX_TIER))? as i32);
    }
    if let Some(v) = input.price_monthly_cents {
        row.price_monthly_cents = Set(within("price_monthly", v, MAX_CENTS)?);
    }
    if let Some(v) = input.price_yearly_cents {
        row.price_yearly_cents = Set(within("price_yearly", v, MAX_CENTS)?);
    }
    if let Some(v) = &input.currency {
        row.currency = Set(currency(v)?);
    }
    if let Some(v) = input.credits_included {
        row.credits_included = Set(within("credits_included", v, MAX_CREDITS)?);
    }
    if let Some(v) = &input.features {
        row.features = Set(features(v)?);
    }
    if let Some(v) = input.active {
        row.active = Set(v);
    }
    if let Some(v) = &input.stripe_price_monthly {
        row.stripe_price_monthly = Set(provider_id("stripe_price_monthly", v)?);
    }
    if let Some(v) = &input.stripe_price_yearly {
        row.stripe_price_yearly = Set(provider_id("stripe_price_yearly", v)?);
    }
    if let Some(v) = &input.creem_product_id {
        row.creem_product_id = Set(provider_id("creem_product_id", v)?);
    }
    Ok(())
}

fn snapshot(p: &plan::Model) -> Value {
    json!({
        "id": p.id, "code": p.code, "name": p.name, "description": p.description,
        "tier": p.tier, "price_monthly_cents": p.price_monthly_cents,
        "price_yearly_cents": p.price_yearly_cents, "currency": p.currency,
        "credits_included": p.credits_included, "features": p.features, "active": p.active,
        "stripe_price_monthly": p.stripe_price_monthly,
        "stripe_price_yearly": p.stripe_price_yearly, "creem_product_id": p.creem_product_id,
    })
}

/// Creates a plan: `code` and `name` required; the rest default (tier 0,
/// free, USD, no credits, no features, active).
pub async fn create(
    db: &DatabaseConnection,
    actor: &str,
    input: &PlanInput,
    now: DateTime<Utc>,
) -> Result<plan::Model> {
    if input.code.is_none() {
        return Err(Error::invalid("code", "is required"));
    }
    if input.name.is_none() {
        return Err(Error::invalid("name", "is required"));
    }
    let mut row = plan::ActiveModel {
        id: Set(format!("plan-{}", uuid::Uuid::now_v7())),
        description: Set(String::new()),
        tier: Set(0),
        price_monthly_cents: Set(0),
        price_yearly_cents: Set(0),
        currency: Set("USD".into()),
        credits_included: Set(0),
        features: Set(json!([])),
        active: Set(true),
        stripe_price_monthly: Set(None),
        stripe_price_yearly: Set(None),
        creem_product_id: Set(None),
        sort_order: Set(100),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    };
    apply(&mut row, input)?;
    let txn = crate::db::begin_write(db).await?;
    let created = row
        .insert(&txn)
        .await
        .map_err(|e| Error::unique_or(e, Error::PlanCodeTaken))?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "plan.create",
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

/// Changes the given fields of plan `id` (`404 PLAN_NOT_FOUND`).
pub async fn update(
    db: &DatabaseConnection,
    actor: &str,
    id: &str,
    input: &PlanInput,
    now: DateTime<Utc>,
) -> Result<plan::Model> {
    let txn = crate::db::begin_write(db).await?;
    let Some(before) = plan::Entity::find_by_id(id).one(&txn).await? else {
        return Err(Error::PlanNotFound);
    };
    let mut row: plan::ActiveModel = before.clone().into();
    apply(&mut row, input)?;
    row.updated_at = Set(now);
    let after = row
        .update(&txn)
        .await
        .map_err(|e| Error::unique_or(e, Error::PlanCodeTaken))?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "plan.update",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_upper_case_and_plain() {
        assert_eq!(
            catalog_code("code", " sub_team-2 ").expect("a valid code"),
            "SUB_TEAM-2"
        );
        assert!(catalog_code("code", "").is_err());
        assert!(catalog_code("code", "a b").is_err());
        assert!(catalog_code("code", &"A".repeat(65)).is_err());
    }

    #[test]
    fn each_field_is_bounded_and_named() {
        let field = |e: Error| match e {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        };
        let mut row = <plan::ActiveModel as Default>::default();
        let bad = [
            PlanInput {
                tier: Some(-1),
                ..Default::default()
            },
            PlanInput {
                price_monthly_cents: Some(-1),
                ..Default::default()
            },
            PlanInput {
                price_yearly_cents: Some(MAX_CENTS + 1),
                ..Default::default()
            },
            PlanInput {
                credits_included: Some(i64::MAX),
                ..Default::default()
            },
            PlanInput {
                currency: Some("dollars".into()),
                ..Default::default()
            },
            PlanInput {
                name: Some(" ".into()),
                ..Default::default()
            },
            PlanInput {
                features: Some(vec![String::new()]),
                ..Default::default()
            },
            PlanInput {
                creem_product_id: Some("x".repeat(256)),
                ..Default::default()
            },
        ];
        let names: Vec<String> = bad
            .iter()
            .map(|i| field(apply(&mut row, i).expect_err("an invalid field")))
            .collect();
        assert_eq!(
            names,
            [
                "tier",
                "price_monthly",
                "price_yearly",
                "credits_included",
                "currency",
                "name",
                "features",
                "creem_product_id"
            ]
        );
    }
}
