//! Reading an organization's credits. Reads take no locks and write
//! nothing: expired lots and holds that no sweep has booked yet are left out
//! here by comparing with the clock, so a read never shows credits that can
//! no longer be spent.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, Value,
};

use super::{Ledger, model::LotKind};
use crate::{
    entities::{credit_lot, ledger_monthly, ledger_transaction, organization, plan},
    error::{Error, Result},
};

/// The transaction types a listing may filter on.
pub const TRANSACTION_TYPES: &[&str] = &[
    "purchase",
    "grant",
    "ai_usage",
    "storage_egress",
    "checkin",
    "coupon",
    "manual",
    "refund",
    "expiry",
    "reservation",
];

/// What "consumption" counts: usage and committed holds. (Committed holds
/// are summed into their meter's usage bucket of `ledger_monthly` when
/// written; `reservation` is listed for rows without a meter.)
const USAGE_TYPES: &[&str] = &["ai_usage", "storage_egress", "reservation"];

/// First instant of `t`'s month.
pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(t)
}

fn months_back(t: DateTime<Utc>, n: u32) -> DateTime<Utc> {
    let total = t.year() * 12 + t.month0() as i32 - n as i32;
    NaiveDate::from_ymd_opt(total.div_euclid(12), total.rem_euclid(12) as u32 + 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| Utc.from_utc_datetime(&d))
        .unwrap_or(t)
}

fn month_key(t: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", t.year(), t.month())
}

/// `?` placeholders for SQLite, `$n` for PostgreSQL.
fn placeholders(backend: DbBackend, sql: &str) -> String {
    if backend != DbBackend::Postgres {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

pub use super::balance::Balance;

const BALANCE_SQL: &str = "SELECT o.balance_micros AS balance, o.held_micros AS held, \
  CAST(COALESCE((SELECT SUM(l.remaining_micros) FROM credit_lots l \
     WHERE l.org_id = o.id AND l.remaining_micros > 0 AND l.kind <> 'pending' AND l.expires_at <= ?), 0) AS BIGINT) AS expired, \
  CAST(COALESCE((SELECT SUM(r.held_micros) FROM reservations r \
     WHERE r.org_id = o.id AND r.status = 'open' AND r.expires_at <= ?), 0) AS BIGINT) AS stale, \
  CAST(COALESCE((SELECT SUM(m.debit_micros - m.credit_micros) FROM ledger_monthly m \
     WHERE m.org_id = o.id AND m.month = ? AND m.type = 'ai_usage'), 0) AS BIGINT) AS ai, \
  CAST(COALESCE((SELECT SUM(m.debit_micros - m.credit_micros) FROM ledger_monthly m \
     WHERE m.org_id = o.id AND m.month = ? AND m.type = 'storage_egress'), 0) AS BIGINT) AS egress, \
  (SELECT MIN(l.expires_at) FROM credit_lots l \
     WHERE l.org_id = o.id AND l.remaining_micros > 0 AND l.kind <> 'pending' AND l.expires_at > ?) AS next_lot_expiry, \
  (SELECT MIN(r.expires_at) FROM reservations r \
     WHERE r.org_id = o.id AND r.status = 'open' AND r.expires_at > ?) AS next_hold_expiry \
  FROM organizations o WHERE o.id = ?";

/// An organization's balance now, in one statement.
///
/// The answer is kept (see [`super::balance`]) until the organization is
/// written to, by this process or, on PostgreSQL, by another replica, or
/// until its next lot or hold expiry or the month's end; a value read while
/// a write was under way is never kept.
pub async fn balance(ledger: &Ledger, org: &str) -> Result<Balance> {
    let now = ledger.now();
    let period_start = month_start(now);
    let Some(org_id) = ledger.org_id(org).await? else {
        return Ok(Balance {
            period_start,
            ..Balance::default()
        });
    };
    let cache = ledger.balance_cache();
    let version = match cache.lock() {
        Ok(c) => {
            if let Some(hit) = c.get(org_id, now) {
                return Ok(hit);
            }
            Some(c.version(org_id))
        }
        Err(_) => None,
    };
    let db = ledger.db();
    let backend = db.get_database_backend();
    let month = month_key(now);
    let values: Vec<Value> = vec![
        now.into(),
        now.into(),
        month.clone().into(),
        month.into(),
        now.into(),
        now.into(),
        org_id.into(),
    ];
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            placeholders(backend, BALANCE_SQL),
            values,
        ))
        .await?
        .ok_or_else(|| Error::internal(format!("organization {org_id} vanished")))?;
    let get = |col: &str| row.try_get::<i64>("", col);
    let stored = get("balance")? - get("expired")?;
    let balance = Balance {
        stored,
        // Lots can expire under open holds: what is held is never shown as
        // more than what is stored, so the balance is never negative.
        realtime: (get("held")? - get("stale")?).min(stored).max(0),
        ai_tokens: get("ai")?,
        storage_egress: get("egress")?,
        period_start,
    };
    if let (Some(version), Ok(mut c)) = (version, cache.lock()) {
        let next_month = period_start + chrono::Months::new(1);
        let until = [
            row.try_get::<Option<DateTime<Utc>>>("", "next_lot_expiry")?,
            row.try_get::<Option<DateTime<Utc>>>("", "next_hold_expiry")?,
        ]
        .into_iter()
        .flatten()
        .fold(next_month, DateTime::min);
        c.put(org_id, version, balance.clone(), until);
    }
    Ok(balance)
}

/// A ledger row with its organization's external id.
#[derive(Debug, Clone)]
pub struct TransactionRow {
    pub row: ledger_transaction::Model,
    pub org: String,
}

/// A page of the ledger, newest first: one organization's (by its exact
/// sequence) or every organization's (by time), read from `db` (which may
/// be a replica; `ledger` only resolves the organization's id).
pub async fn transactions(
    ledger: &Ledger,
    db: &impl ConnectionTrait,
    org: Option<&str>,
    kind: Option<&str>,
    limit: u64,
    offset: u64,
) -> Result<(Vec<TransactionRow>, u64)> {
    let mut query = ledger_transaction::Entity::find();
    if let Some(org) = org {
        let Some(org_id) = ledger.org_id(org).await? else {
            return Ok((Vec::new(), 0));
        };
        query = query
            .filter(ledger_transaction::Column::OrgId.eq(org_id))
            .order_by_desc(ledger_transaction::Column::Seq);
    } else {
        query = query
            .order_by_desc(ledger_transaction::Column::CreatedAt)
            .order_by_desc(ledger_transaction::Column::Id);
    }
    if let Some(kind) = kind {
        query = query.filter(ledger_transaction::Column::Kind.eq(kind));
    }
    let total = query.clone().count(db).await?;
    let rows = query.limit(limit).offset(offset).all(db).await?;
    let mut names: HashMap<i64, String> = HashMap::new();
    let ids: Vec<i64> = rows.iter().map(|r| r.org_id).collect();
    if !ids.is_empty() {
        for o in organization::Entity::find()
            .filter(organization::Column::Id.is_in(ids))
            .all(db)
            .await?
        {
            names.insert(o.id, o.external_id);
        }
    }
    Ok((
        rows.into_iter()
            .map(|row| TransactionRow {
                org: names.get(&row.org_id).cloned().unwrap_or_default(),
                row,
            })
            .collect(),
        total,
    ))
}

/// One month of credit movements (CONTRACT §3 categories).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthStat {
    pub month: Option<DateTime<Utc>>,
    pub consumption: i64,
    pub purchases: i64,
    pub grants: i64,
    pub adjustments: i64,
}

impl MonthStat {
    /// Net change: grants + purchases − consumption + adjustments.
    pub fn balance(&self) -> i64 {
        self.grants + self.purchases - self.consumption + self.adjustments
    }

    fn add(&mut self, kind: &str, credit: i64, debit: i64) {
        let net = credit - debit;
        match kind {
            k if USAGE_TYPES.contains(&k) => self.consumption -= net,
            "purchase" => self.purchases += net,
            "grant" | "checkin" | "coupon" => self.grants += net,
            "manual" => {
                self.grants += credit;
                self.adjustments -= debit;
            }
            _ => self.adjustments += net,
        }
    }
}

/// `months` months up to and including the current one, ascending and
/// zero-filled, with their totals, read from `db` (which may be a replica).
pub async fn monthly_stats(
    ledger: &Ledger,
    db: &impl ConnectionTrait,
    org: &str,
    months: u32,
) -> Result<(Vec<MonthStat>, MonthStat)> {
    let now = ledger.now();
    let first = months_back(month_start(now), months.saturating_sub(1));
    let mut out: Vec<MonthStat> = (0..months)
        .map(|i| MonthStat {
            month: Some(months_back(month_start(now), months - 1 - i)),
            ..MonthStat::default()
        })
        .collect();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, m) in out.iter().enumerate() {
        if let Some(month) = m.month {
            index.insert(month_key(month), i);
        }
    }
    let org_id = ledger.org_id(org).await?;
    if let Some(org_id) = org_id {
        let rows = ledger_monthly::Entity::find()
            .filter(ledger_monthly::Column::OrgId.eq(org_id))
            .filter(ledger_monthly::Column::Month.gte(month_key(first)))
            .all(db)
            .await?;
        for r in rows {
            if let Some(&i) = index.get(&r.month) {
                out[i].add(&r.kind, r.credit_micros, r.debit_micros);
            }
        }
    }
    let mut totals = MonthStat::default();
    for m in &out {
        totals.consumption += m.consumption;
        totals.purchases += m.purchases;
        totals.grants += m.grants;
        totals.adjustments += m.adjustments;
    }
    Ok((out, totals))
}

/// A lot as `/user/credits/info` shows it.
#[derive(Debug, Clone)]
pub struct LotView {
    pub id: i64,
    pub kind: LotKind,
    pub allocated: i64,
    pub remaining: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct CreditInfo {
    pub balance: Balance,
    /// Live lots with credits left (pending ones included), spend order.
    pub lots: Vec<LotView>,
    /// The effective plan and since when: the active subscription's, or the
    /// free plan's.
    pub plan: Option<plan::Model>,
    pub plan_since: DateTime<Utc>,
}

pub async fn credit_info(ledger: &Ledger, org: &str) -> Result<CreditInfo> {
    let now = ledger.now();
    let balance = balance(ledger, org).await?;
    let db = ledger.db();
    let mut lots = Vec::new();
    let mut plan_since = now;
    let org_id = ledger.org_id(org).await?;
    if let Some(org_id) = org_id {
        let rows = credit_lot::Entity::find()
            .filter(credit_lot::Column::OrgId.eq(org_id))
            .filter(credit_lot::Column::RemainingMicros.gt(0))
            .filter(
                Condition::any()
                    .add(credit_lot::Column::ExpiresAt.is_null())
                    .add(credit_lot::Column::ExpiresAt.gt(now)),
            )
            .all(db)
            .await?;
        let mut model_lots: Vec<super::model::Lot> = rows
            .into_iter()
            .filter_map(super::store::stored_lot)
            .collect();
        model_lots.sort_by(super::model::spend_order);
        lots = model_lots
            .into_iter()
            .filter_map(|l| match l.id {
                super::model::LotRef::Stored(id) => Some(LotView {
                    id,
                    kind: l.kind,
                    allocated: l.allocated,
                    remaining: l.remaining,
                    expires_at: l.expires_at,
                    created_at: l.created_at,
                }),
                super::model::LotRef::New(_) => None,
            })
            .collect();
    }
    let (sub, plan_row) = crate::catalog::effective_plan(db, org_id, now).await?;
    if let Some(sub) = sub {
        plan_since = sub.created_at;
    } else if let Some(org_id) = org_id
        && let Some(o) = organization::Entity::find_by_id(org_id).one(db).await?
    {
        plan_since = o.created_at;
    }
    Ok(CreditInfo {
        balance,
        lots,
        plan: plan_row,
        plan_since,
    })
}

/// Holds open in the whole database: how many, and the micro-credits they
/// hold (for `/metrics`).
pub async fn open_holds(db: &impl ConnectionTrait) -> Result<(i64, i64)> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS holds, coalesce(sum(held_micros), 0) AS micros \
             FROM reservations WHERE status = 'open'",
        ))
        .await?
        .ok_or_else(|| Error::internal("count of open holds returned no row"))?;
    Ok((row.try_get("", "holds")?, row.try_get("", "micros")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_arithmetic() {
        let t = Utc
            .with_ymd_and_hms(2026, 2, 15, 10, 0, 0)
            .single()
            .unwrap_or_default();
        assert_eq!(month_key(months_back(month_start(t), 2)), "2025-12");
        assert_eq!(month_key(months_back(month_start(t), 0)), "2026-02");
        assert_eq!(month_key(months_back(month_start(t), 14)), "2024-12");
    }

    #[test]
    fn categories_follow_the_contract() {
        let mut m = MonthStat::default();
        m.add("ai_usage", 0, 120);
        m.add("purchase", 1100, 0);
        m.add("grant", 500, 0);
        m.add("manual", 30, 10);
        m.add("expiry", 0, 5);
        m.add("reservation", 0, 7);
        assert_eq!(
            (m.consumption, m.purchases, m.grants, m.adjustments),
            (127, 1100, 530, -15)
        );
        assert_eq!(m.balance(), 530 + 1100 - 127 - 15);
    }

    #[test]
    fn postgres_placeholders_are_numbered() {
        assert_eq!(
            placeholders(DbBackend::Postgres, "a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(placeholders(DbBackend::Sqlite, "a = ?"), "a = ?");
    }
}
