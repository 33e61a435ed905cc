//! Daily check-in: free credits once per user per UTC day.
//!
//! A check-in is one ledger grant of a `checkin` lot (expiring after the
//! configured `lot_expiry_days`) whose source is the user and the day, with
//! the `checkins` row written in the grant's own transaction: the award and
//! the row cannot disagree after a crash, and the database (the lot source
//! and `(user_id, day)` are both unique) gives one award however many
//! requests race, on any number of replicas. The organization's row lock
//! taken by the ledger serializes one user's racing requests, so the later
//! ones find the grant made and answer `ALREADY_CHECKED_IN`.
//!
//! Days are UTC days of the injected clock; the rules are in [`rule`]. The
//! configuration is one row read at every check-in, so a change applies to
//! the next check-in on every replica.

pub mod rule;

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    sea_query::{OnConflict, Query},
};
use serde_json::json;

use crate::{
    audit,
    domain::MICROS_PER_CREDIT,
    entities::{checkin, checkin_config},
    error::{Error, Result},
    ledger::{GrantInput, LotKind, SideWrite, model::MAX_MICROS},
    state::AppState,
};

/// The check-in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub enabled: bool,
    pub credits_per_day_micros: i64,
    pub lot_expiry_days: i32,
    pub streak_bonus_micros: i64,
}

/// Longest lot lifetime a configuration may set, days.
pub const MAX_EXPIRY_DAYS: i32 = 3650;

impl Config {
    /// The configuration if every field is within bounds, else the first
    /// field that is not.
    pub fn validated(self) -> Result<Self> {
        let credits = |field: &str, v: i64| {
            if !(0..=MAX_MICROS).contains(&v) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "must be between 0 and {} credits",
                        MAX_MICROS / MICROS_PER_CREDIT
                    ),
                ));
            }
            Ok(())
        };
        credits("credits_per_day", self.credits_per_day_micros)?;
        if !(1..=MAX_EXPIRY_DAYS).contains(&self.lot_expiry_days) {
            return Err(Error::invalid(
                "lot_expiry_days",
                format!("must be between 1 and {MAX_EXPIRY_DAYS}"),
            ));
        }
        credits("streak_bonus", self.streak_bonus_micros)?;
        Ok(self)
    }

    fn award(&self) -> rule::Award {
        rule::Award {
            credits_per_day_micros: self.credits_per_day_micros,
            streak_bonus_micros: self.streak_bonus_micros,
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "enabled": self.enabled,
            "credits_per_day_micros": self.credits_per_day_micros,
            "lot_expiry_days": self.lot_expiry_days,
            "streak_bonus_micros": self.streak_bonus_micros,
        })
    }
}

impl From<checkin_config::Model> for Config {
    fn from(m: checkin_config::Model) -> Self {
        Self {
            enabled: m.enabled,
            credits_per_day_micros: m.credits_per_day_micros,
            lot_expiry_days: m.lot_expiry_days,
            streak_bonus_micros: m.streak_bonus_micros,
        }
    }
}

/// Used when the row is missing (a database seeded before check-in
/// existed): check-in off.
const OFF: Config = Config {
    enabled: false,
    credits_per_day_micros: 0,
    lot_expiry_days: 30,
    streak_bonus_micros: 0,
};

pub async fn config(db: &impl ConnectionTrait) -> Result<Config> {
    Ok(checkin_config::Entity::find_by_id(1)
        .one(db)
        .await?
        .map_or(OFF, Config::from))
}

/// Replaces the configuration, audited in the same transaction.
pub async fn update_config(state: &AppState, actor: &str, new: Config) -> Result<Config> {
    let new = new.validated()?;
    let now = state.clock.now();
    let txn = crate::db::begin_write(&state.db).await?;
    let before = checkin_config::Entity::find_by_id(1).one(&txn).await?;
    let row = checkin_config::ActiveModel {
        id: sea_orm::ActiveValue::Set(1),
        enabled: sea_orm::ActiveValue::Set(new.enabled),
        credits_per_day_micros: sea_orm::ActiveValue::Set(new.credits_per_day_micros),
        lot_expiry_days: sea_orm::ActiveValue::Set(new.lot_expiry_days),
        streak_bonus_micros: sea_orm::ActiveValue::Set(new.streak_bonus_micros),
        updated_at: sea_orm::ActiveValue::Set(now),
    };
    checkin_config::Entity::insert(row)
        .on_conflict(
            OnConflict::column(checkin_config::Column::Id)
                .update_columns([
                    checkin_config::Column::Enabled,
                    checkin_config::Column::CreditsPerDayMicros,
                    checkin_config::Column::LotExpiryDays,
                    checkin_config::Column::StreakBonusMicros,
                    checkin_config::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    audit::record(
        &txn,
        audit::Change::catalog(
            actor,
            "checkin_config.update",
            "checkin_config",
            before.map(|b| Config::from(b).json()).unwrap_or_default(),
            new.json(),
        ),
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(new)
}

/// What a check-in gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Awarded {
    pub credits_micros: i64,
    pub streak: i32,
    pub next_checkin_at: DateTime<Utc>,
    /// The organization's spendable balance after the award.
    pub balance_micros: i64,
}

async fn row(
    db: &impl ConnectionTrait,
    user: &str,
    day: chrono::NaiveDate,
) -> Result<Option<checkin::Model>> {
    Ok(checkin::Entity::find()
        .filter(checkin::Column::UserId.eq(user))
        .filter(checkin::Column::Day.eq(rule::day_key(day)))
        .one(db)
        .await?)
}

/// Today's check-in of `user` for organization `org`.
pub async fn check_in(state: &AppState, org: &str, user: &str) -> Result<Awarded> {
    let config = config(&state.db).await?;
    if !config.enabled {
        return Err(Error::CheckinDisabled);
    }
    let now = state.clock.now();
    let today = rule::today(now);
    if row(&state.db, user, today).await?.is_some() {
        return Err(Error::AlreadyCheckedIn);
    }
    let streak = rule::streak(
        row(&state.db, user, rule::yesterday(today))
            .await?
            .map(|r| r.streak),
    );
    let credits = rule::award(config.award(), streak);
    let org_id = state.ledger.ensure_org(org).await?;
    let day = rule::day_key(today);
    let insert = Query::insert()
        .into_table(checkin::Entity)
        .columns([
            checkin::Column::OrgId,
            checkin::Column::UserId,
            checkin::Column::Day,
            checkin::Column::Streak,
            checkin::Column::CreditsMicros,
            checkin::Column::CreatedAt,
        ])
        .values_panic([
            org_id.into(),
            user.into(),
            day.clone().into(),
            streak.into(),
            credits.into(),
            now.into(),
        ])
        .on_conflict(
            OnConflict::columns([checkin::Column::UserId, checkin::Column::Day])
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    let statement = state.db.get_database_backend().build(&insert);
    let next_checkin_at = rule::next_checkin_at(now);

    if credits == 0 {
        // Nothing to grant: the row alone records the day.
        if state.db.execute_raw(statement).await?.rows_affected() == 0 {
            return Err(Error::AlreadyCheckedIn);
        }
        let balance = crate::ledger::reads::balance(&state.ledger, org).await?;
        return Ok(Awarded {
            credits_micros: 0,
            streak,
            next_checkin_at,
            balance_micros: balance.stored - balance.realtime,
        });
    }
    let out = state
        .ledger
        .grant(GrantInput {
            org: org.into(),
            entry_kind: "checkin",
            lot_kind: LotKind::Checkin,
            amount: credits,
            expires_at: Some(now + TimeDelta::days(i64::from(config.lot_expiry_days))),
            source_type: "checkin".into(),
            source_id: Some(format!("{user}:{day}")),
            description: if streak > 1 {
                format!("Daily check-in, day {streak} of a streak")
            } else {
                "Daily check-in".into()
            },
            then: vec![SideWrite {
                statement,
                expect_rows: Some(1),
            }],
        })
        .await?;
    if out.duplicate {
        return Err(Error::AlreadyCheckedIn);
    }
    Ok(Awarded {
        credits_micros: credits,
        streak,
        next_checkin_at,
        balance_micros: out.balance_micros,
    })
}

/// Whether `user` has checked in today, and the streak as it stands: today's
/// if checked in, else yesterday's (still alive until today ends), else 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub config: Config,
    pub checked_in_today: bool,
    pub streak: i32,
    pub next_checkin_at: DateTime<Utc>,
}

pub async fn status(state: &AppState, user: &str) -> Result<Status> {
    let config = config(&state.db).await?;
    let now = state.clock.now();
    let today = rule::today(now);
    let (checked_in_today, streak) = match row(&state.db, user, today).await? {
        Some(r) => (true, r.streak),
        None => (
            false,
            row(&state.db, user, rule::yesterday(today))
                .await?
                .map_or(0, |r| r.streak),
        ),
    };
    Ok(Status {
        config,
        checked_in_today,
        streak,
        next_checkin_at: if checked_in_today {
            rule::next_checkin_at(now)
        } else {
            now
        },
    })
}
