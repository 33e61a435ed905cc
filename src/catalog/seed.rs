//! The default catalog of CONTRACT §7, written once into an empty database.
//!
//! Every insert is `ON CONFLICT DO NOTHING` inside one transaction, so two
//! replicas starting on a fresh database both succeed and the rows exist once.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, TransactionSession,
    TransactionTrait, sea_query::OnConflict,
};

use crate::{
    domain::{MICROS_PER_CREDIT, Meter},
    entities::{checkin_config, pack, plan, rate},
};

struct PlanSeed {
    id: &'static str,
    code: &'static str,
    name: &'static str,
    description: &'static str,
    tier: i32,
    monthly: i64,
    yearly: i64,
    credits: i64,
    features: &'static [&'static str],
}

const PLANS: &[PlanSeed] = &[
    PlanSeed {
        id: "sub-base",
        code: "SUB_BASE",
        name: "Free",
        description: "Daily check-in credits and pay-as-you-go usage",
        tier: 0,
        monthly: 0,
        yearly: 0,
        credits: 0,
        features: &["Daily check-in credits", "Community support"],
    },
    PlanSeed {
        id: "sub-starter",
        code: "SUB_STARTER",
        name: "Starter",
        description: "For individuals getting started",
        tier: 1,
        monthly: 499,
        yearly: 4990,
        credits: 3000,
        features: &["AI chat", "Credit packs", "Email support"],
    },
    PlanSeed {
        id: "sub-pro",
        code: "SUB_PRO",
        name: "Pro",
        description: "For growing teams",
        tier: 2,
        monthly: 999,
        yearly: 9990,
        credits: 10000,
        features: &["Unlimited AI chat", "Priority support"],
    },
    PlanSeed {
        id: "sub-enterprise",
        code: "SUB_ENTERPRISE",
        name: "Enterprise",
        description: "For organizations with custom needs",
        tier: 3,
        monthly: 4999,
        yearly: 49990,
        credits: 60000,
        features: &["Unlimited AI chat", "Dedicated support", "SSO"],
    },
];

/// (id, code, name, credits, price in cents)
const PACKS: &[(&str, &str, &str, i64, i64)] = &[
    ("pack-1", "PACK_1", "Pack 1", 100, 1999),
    ("pack-2", "PACK_2", "Pack 2", 500, 4999),
    ("pack-3", "PACK_3", "Pack 3", 1100, 9999),
];

/// Per-cycle purchase limit of each pack, and the expiry of top-up lots.
const PACK_LIMIT_PER_CYCLE: i32 = 3;
const TOP_UP_EXPIRY_DAYS: i32 = 365;

/// (id, meter, model or "" for the meter default, credits per unit in micros, description)
const RATES: &[(&str, Meter, &str, i64, &str)] = &[
    (
        "rate-storage-egress",
        Meter::StorageEgress,
        "",
        MICROS_PER_CREDIT,
        "Storage egress, per GB",
    ),
    (
        "rate-ai-tokens",
        Meter::AiTokens,
        "",
        2 * MICROS_PER_CREDIT,
        "AI tokens, default model, per 1M tokens",
    ),
    (
        "rate-ai-tokens-gpt-4o",
        Meter::AiTokens,
        "gpt-4o",
        10 * MICROS_PER_CREDIT,
        "AI tokens on gpt-4o, per 1M tokens",
    ),
    (
        "rate-ai-tokens-gpt-4o-mini",
        Meter::AiTokens,
        "gpt-4o-mini",
        MICROS_PER_CREDIT / 2,
        "AI tokens on gpt-4o-mini, per 1M tokens",
    ),
    (
        "rate-ai-tokens-claude-sonnet",
        Meter::AiTokens,
        "claude-sonnet",
        6 * MICROS_PER_CREDIT,
        "AI tokens on claude-sonnet, per 1M tokens",
    ),
];

/// Seeds plans, packs, rates and the check-in configuration when the
/// database has no plans. Returns whether it seeded.
pub async fn seed_default_catalog<C>(db: &C, now: DateTime<Utc>) -> Result<bool, DbErr>
where
    C: ConnectionTrait + TransactionTrait,
{
    if plan::Entity::find().count(db).await? > 0 {
        return Ok(false);
    }
    let txn = db.begin().await?;

    let plans = PLANS.iter().enumerate().map(|(i, p)| plan::ActiveModel {
        id: Set(p.id.into()),
        code: Set(p.code.into()),
        name: Set(p.name.into()),
        description: Set(p.description.into()),
        tier: Set(p.tier),
        price_monthly_cents: Set(p.monthly),
        price_yearly_cents: Set(p.yearly),
        currency: Set("USD".into()),
        credits_included: Set(p.credits),
        features: Set(serde_json::json!(p.features)),
        active: Set(true),
        stripe_price_monthly: Set(None),
        stripe_price_yearly: Set(None),
        creem_product_id: Set(None),
        sort_order: Set(i as i32),
        created_at: Set(now),
        updated_at: Set(now),
    });
    plan::Entity::insert_many(plans)
        .on_conflict(OnConflict::column(plan::Column::Id).do_nothing().to_owned())
        .exec_without_returning(&txn)
        .await?;

    let packs = PACKS
        .iter()
        .enumerate()
        .map(|(i, &(id, code, name, credits, cents))| pack::ActiveModel {
            id: Set(id.into()),
            code: Set(code.into()),
            name: Set(name.into()),
            credits: Set(credits),
            price_cents: Set(cents),
            currency: Set("USD".into()),
            active: Set(true),
            limit_per_cycle: Set(PACK_LIMIT_PER_CYCLE),
            lot_expiry_days: Set(Some(TOP_UP_EXPIRY_DAYS)),
            stripe_price_id: Set(None),
            creem_product_id: Set(None),
            sort_order: Set(i as i32),
            created_at: Set(now),
        });
    pack::Entity::insert_many(packs)
        .on_conflict(OnConflict::column(pack::Column::Id).do_nothing().to_owned())
        .exec_without_returning(&txn)
        .await?;

    let rates = RATES.iter().map(
        |&(id, meter, model, micros, description)| rate::ActiveModel {
            id: Set(id.into()),
            meter: Set(meter.as_str().into()),
            model: Set(model.into()),
            unit: Set(meter.unit().into()),
            unit_size: Set(meter.unit_size()),
            credits_per_unit_micros: Set(micros),
            description: Set(description.into()),
            active: Set(true),
            created_at: Set(now),
        },
    );
    rate::Entity::insert_many(rates)
        .on_conflict(OnConflict::column(rate::Column::Id).do_nothing().to_owned())
        .exec_without_returning(&txn)
        .await?;

    checkin_config::Entity::insert(checkin_config::ActiveModel {
        id: Set(1),
        enabled: Set(true),
        credits_per_day_micros: Set(5 * MICROS_PER_CREDIT),
        lot_expiry_days: Set(30),
        streak_bonus_micros: Set(0),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(checkin_config::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(&txn)
    .await?;

    txn.commit().await?;
    tracing::info!("seeded the default catalog");
    Ok(true)
}
