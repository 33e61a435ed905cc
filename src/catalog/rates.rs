//! Rate administration: what one unit of usage costs, per meter and per
//! model, each write validated and audited in its own transaction.
//!
//! Every meter keeps a **default rate** (model unset), which usage on a
//! model without a rate of its own falls back to: it can be repriced but
//! not removed nor switched off (`409 DEFAULT_RATE_REQUIRED`), so that a
//! meter is never left unpriced. A per-model rate can be repriced, switched
//! off (its model falls back to the default) or removed. (meter, model) is
//! unique (`409 RATE_TAKEN`, the unique index deciding). The unit comes
//! from the meter: 1 GB for `storage_egress`, 1M tokens for `ai_tokens`.
//!
//! The ledger prices usage from rates held in memory: the replica that made
//! the change reloads them at once, every other replica at its next
//! periodic reload (`RATE_REFRESH_SECONDS`).

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, DatabaseConnection, EntityTrait, ModelTrait, QueryOrder,
};
use serde_json::{Value, json};

use super::plans::text;
use crate::{
    audit,
    domain::{MICROS_PER_CREDIT, Meter},
    entities::rate,
    error::{Error, Result},
};

/// Most micro-credits one unit may cost: 10^12 credits.
pub const MAX_PER_UNIT_MICROS: i64 = 1_000_000_000_000 * MICROS_PER_CREDIT;
const MAX_MODEL: usize = 128;
const MAX_DESCRIPTION: usize = 255;

/// Rate fields as given; `None` is "not given". `meter` and `model` are
/// set on creation only (they are what the rate is for).
#[derive(Debug, Clone, Default)]
pub struct RateInput {
    pub meter: Option<String>,
    pub model: Option<String>,
    pub credits_per_unit_micros: Option<i64>,
    pub description: Option<String>,
    pub active: Option<bool>,
}

/// A model name: 1–128 of letters, digits and `. _ - : /`.
fn model_name(value: &str) -> Result<String> {
    let v = value.trim();
    let n = v.chars().count();
    if n == 0 || n > MAX_MODEL {
        return Err(Error::invalid(
            "model",
            format!("must be 1 to {MAX_MODEL} characters (omit it for the meter's default rate)"),
        ));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c))
    {
        return Err(Error::invalid(
            "model",
            "may hold only letters, digits and . _ - : /",
        ));
    }
    Ok(v.to_owned())
}

fn per_unit(value: i64) -> Result<i64> {
    if !(0..=MAX_PER_UNIT_MICROS).contains(&value) {
        return Err(Error::invalid(
            "credits_per_unit",
            "must be between 0 and 10^12 credits",
        ));
    }
    Ok(value)
}

/// The fields an update may change, validated onto `row`.
fn apply(row: &mut rate::ActiveModel, input: &RateInput, is_default: bool) -> Result<()> {
    if let Some(v) = input.credits_per_unit_micros {
        row.credits_per_unit_micros = Set(per_unit(v)?);
    }
    if let Some(v) = &input.description {
        row.description = Set(text("description", v, 0, MAX_DESCRIPTION)?);
    }
    if let Some(v) = input.active {
        if !v && is_default {
            return Err(Error::DefaultRateRequired);
        }
        row.active = Set(v);
    }
    Ok(())
}

fn snapshot(r: &rate::Model) -> Value {
    json!({
        "id": r.id, "meter": r.meter, "model": r.model, "unit": r.unit,
        "credits_per_unit_micros": r.credits_per_unit_micros,
        "description": r.description, "active": r.active,
    })
}

/// Every rate, switched-off ones included: by meter, the default first.
pub async fn list_all(db: &DatabaseConnection) -> Result<Vec<rate::Model>> {
    Ok(rate::Entity::find()
        .order_by_asc(rate::Column::Meter)
        .order_by_asc(rate::Column::Model)
        .all(db)
        .await?)
}

/// Creates a rate: `meter` and `credits_per_unit` required; no `model`
/// makes the meter's default rate.
pub async fn create(
    db: &DatabaseConnection,
    actor: &str,
    input: &RateInput,
    now: DateTime<Utc>,
) -> Result<rate::Model> {
    let meter: Meter = input
        .meter
        .as_deref()
        .ok_or_else(|| Error::invalid("meter", "is required"))?
        .trim()
        .parse()
        .map_err(|e: String| Error::invalid("meter", e))?;
    let model = match input.model.as_deref().map(str::trim) {
        None | Some("") => String::new(),
        Some(m) => model_name(m)?,
    };
    if input.credits_per_unit_micros.is_none() {
        return Err(Error::invalid("credits_per_unit", "is required"));
    }
    let mut row = rate::ActiveModel {
        id: Set(format!("rate-{}", uuid::Uuid::now_v7())),
        meter: Set(meter.as_str().into()),
        unit: Set(meter.unit().into()),
        unit_size: Set(meter.unit_size()),
        description: Set(String::new()),
        active: Set(true),
        created_at: Set(now),
        model: Set(model.clone()),
        ..Default::default()
    };
    apply(&mut row, input, model.is_empty())?;
    let txn = crate::db::begin_write(db).await?;
    let created = row
        .insert(&txn)
        .await
        .map_err(|e| Error::unique_or(e, Error::RateTaken))?;
    let change = audit::Change::catalog(
        actor,
        "rate.create",
        &created.id,
        Value::Null,
        snapshot(&created),
    );
    audit::record(&txn, change, now).await?;
    txn.commit().await?;
    Ok(created)
}

/// Changes the given fields of rate `id` (`404 RATE_NOT_FOUND`).
pub async fn update(
    db: &DatabaseConnection,
    actor: &str,
    id: &str,
    input: &RateInput,
    now: DateTime<Utc>,
) -> Result<rate::Model> {
    for (given, field) in [
        (input.meter.is_some(), "meter"),
        (input.model.is_some(), "model"),
    ] {
        if given {
            return Err(Error::invalid(
                field,
                "cannot change: create a rate for the other meter or model",
            ));
        }
    }
    let txn = crate::db::begin_write(db).await?;
    let Some(before) = rate::Entity::find_by_id(id).one(&txn).await? else {
        return Err(Error::RateNotFound);
    };
    let mut row: rate::ActiveModel = before.clone().into();
    apply(&mut row, input, before.model.is_empty())?;
    let after = row.update(&txn).await?;
    let change = audit::Change::catalog(
        actor,
        "rate.update",
        id,
        snapshot(&before),
        snapshot(&after),
    );
    audit::record(&txn, change, now).await?;
    txn.commit().await?;
    Ok(after)
}

/// Removes per-model rate `id`; its model falls back to the meter's
/// default. A default rate cannot be removed.
pub async fn delete(
    db: &DatabaseConnection,
    actor: &str,
    id: &str,
    now: DateTime<Utc>,
) -> Result<rate::Model> {
    let txn = crate::db::begin_write(db).await?;
    let Some(before) = rate::Entity::find_by_id(id).one(&txn).await? else {
        return Err(Error::RateNotFound);
    };
    if before.model.is_empty() {
        return Err(Error::DefaultRateRequired);
    }
    before.clone().delete(&txn).await?;
    let change = audit::Change::catalog(actor, "rate.delete", id, snapshot(&before), Value::Null);
    audit::record(&txn, change, now).await?;
    txn.commit().await?;
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_and_prices_are_bounded() {
        assert_eq!(model_name(" gpt-4o ").expect("valid"), "gpt-4o");
        assert!(model_name("anthropic/claude-3.5:beta").is_ok());
        assert!(model_name("").is_err());
        assert!(model_name("two words").is_err());
        assert!(model_name(&"m".repeat(129)).is_err());
        assert_eq!(per_unit(0).expect("free is allowed"), 0);
        assert!(per_unit(-1).is_err());
        assert!(per_unit(MAX_PER_UNIT_MICROS + 1).is_err());
    }

    #[test]
    fn a_default_rate_cannot_be_switched_off() {
        let mut row = <rate::ActiveModel as Default>::default();
        let off = RateInput {
            active: Some(false),
            ..RateInput::default()
        };
        assert!(matches!(
            apply(&mut row, &off, true),
            Err(Error::DefaultRateRequired)
        ));
        assert!(apply(&mut row, &off, false).is_ok());
    }
}
