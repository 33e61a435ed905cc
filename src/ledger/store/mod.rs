//! The rows of one write batch: lock the organizations, load what the
//! batch needs, write what it changed. Two implementations of these steps:
//!
//! * [`portable`]: sea-orm's query builder, a statement per table (SQLite,
//!   where a round trip is a function call);
//! * [`postgres`]: hand-written SQL with the rows passed as JSON, so every
//!   step is one statement with a fixed text (prepared once, planned once)
//!   and a batch is four round trips whatever it holds: `BEGIN`, lock and
//!   load, write, `COMMIT` (or one, for a warm batch: a checked,
//!   autocommitted write; see [`Expected`]).
//!
//! Both are driven by the same engine code and the same tests (every
//! integration test runs on SQLite and on PostgreSQL).

mod portable;
mod postgres;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr};
use serde::Serialize;

use super::model::{Lot, LotKind, LotRef};
use crate::entities::{admin_audit, credit_lot, ledger_transaction, reservation};

/// An organization's row as a batch locks it (and as it writes it back).
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct OrgRow {
    pub id: i64,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub ledger_seq: i64,
    /// PostgreSQL, an unlocked batch: the row must still hold these values
    /// when it is written, or the whole write fails and changes nothing.
    #[serde(flatten)]
    pub expected: Option<Expected>,
}

/// What an organization row held when an unlocked batch started from it.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Expected {
    #[serde(rename = "expected_balance")]
    pub balance_micros: i64,
    #[serde(rename = "expected_held")]
    pub held_micros: i64,
    #[serde(rename = "expected_seq")]
    pub ledger_seq: i64,
}

/// What a batch loads once its organizations are locked: their rows,
/// their live lots, their open holds that have expired by `now` (where
/// credits are held), and the following.
pub(super) struct Wanted {
    pub org_ids: Vec<i64>,
    /// Holds the batch commits or releases.
    pub named_holds: Vec<String>,
    pub keys: Vec<KeyRef>,
    pub sources: Vec<SourceRef>,
    pub now: DateTime<Utc>,
}

/// One of the batch's idempotency keys.
#[derive(Debug, Clone, Serialize)]
pub(super) struct KeyRef {
    pub org_id: i64,
    pub method: &'static str,
    pub key: String,
}

/// The method under which a `Consume`'s idempotency key is kept: the
/// engine names its keys so, and the stores look keys of this method up on
/// the ledger rows (the PostgreSQL statements and the
/// `m20261207_000002_consume_keys` migration spell it `'consume'` too).
pub(super) const CONSUME_METHOD: &str = "consume";

/// The source of one of the batch's grants.
#[derive(Debug, Clone, Serialize)]
pub(super) struct SourceRef {
    pub source_type: String,
    pub source_id: String,
}

/// A stored idempotency record.
#[derive(Debug, Clone, Serialize)]
pub(super) struct IdemRow {
    pub org_id: i64,
    pub method: String,
    pub key: String,
    pub request_hash: String,
    pub response: String,
}

/// A `Consume`'s ledger row, which is its idempotency record: the key,
/// the fingerprint, and what the call answered.
#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct ConsumeKeyRow {
    pub org_id: i64,
    pub key: String,
    pub request_hash: String,
    pub transaction_id: String,
    pub charged_micros: i64,
    pub available_after_micros: i64,
}

/// What [`Wanted`] found.
#[derive(Default)]
pub(super) struct Loaded {
    /// Live lots (credits left, not pending) of the organizations.
    pub lots: Vec<credit_lot::Model>,
    pub holds: Vec<reservation::Model>,
    /// Stored records of the batch's keys (any method; `Consume` keys only
    /// from before their ledger rows became their records).
    pub idempotency: Vec<IdemRow>,
    /// The ledger rows that record the batch's `Consume` keys.
    pub consume_keys: Vec<ConsumeKeyRow>,
    /// The (source type, source id) pairs that already granted a lot.
    pub sources: BTreeSet<(String, String)>,
}

/// A lot created by the batch, before it has a row id.
pub(super) struct NewLot {
    pub org_id: i64,
    pub kind: &'static str,
    pub allocated_micros: i64,
    pub remaining_micros: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub source_type: String,
    pub source_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A lot's new remainder.
#[derive(Serialize)]
pub(super) struct LotUpdate {
    pub id: i64,
    pub remaining_micros: i64,
}

/// A `pending` lot that settled in this batch.
pub(super) struct SettledLot {
    pub id: i64,
    pub kind: &'static str,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Micros a ledger row moved into (+) or out of (-) a lot.
#[derive(Serialize)]
pub(super) struct Allocation {
    pub transaction_id: String,
    pub lot_id: i64,
    pub amount_micros: i64,
}

/// A hold the batch finished (committed, released or expired).
#[derive(Serialize)]
pub(super) struct FinishedHold {
    pub id: String,
    pub status: &'static str,
    pub transaction_id: Option<String>,
    pub charged_micros: Option<i64>,
}

/// Additions to one organization's month of one transaction type.
#[derive(Serialize)]
pub(super) struct MonthlyRow {
    pub org_id: i64,
    pub month: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub credit_micros: i64,
    pub debit_micros: i64,
}

/// Every change of a batch except new lots (inserted first, because
/// allocations need their ids).
#[derive(Default)]
pub(super) struct Rows {
    pub lot_updates: Vec<LotUpdate>,
    pub settled_lots: Vec<SettledLot>,
    pub entries: Vec<ledger_transaction::Model>,
    pub allocations: Vec<Allocation>,
    pub monthly: Vec<MonthlyRow>,
    pub new_holds: Vec<reservation::Model>,
    pub finished_holds: Vec<FinishedHold>,
    pub idempotency: Vec<IdemRow>,
    pub audits: Vec<admin_audit::ActiveModel>,
    pub orgs: Vec<OrgRow>,
}

impl Rows {
    pub fn is_empty(&self) -> bool {
        self.lot_updates.is_empty()
            && self.settled_lots.is_empty()
            && self.entries.is_empty()
            && self.allocations.is_empty()
            && self.monthly.is_empty()
            && self.new_holds.is_empty()
            && self.finished_holds.is_empty()
            && self.idempotency.is_empty()
            && self.audits.is_empty()
            && self.orgs.is_empty()
    }
}

/// `a + b` of two non-negative monthly sums, stopping at `i64::MAX`
/// instead of overflowing: the sums are statistics, and a month of
/// maximal grants must not make every later write of the organization fail.
/// (The PostgreSQL write statement spells the same expression in its fixed
/// text.)
fn saturating_sum(a: &str, b: &str) -> String {
    let max = i64::MAX;
    format!("CASE WHEN {a} > {max} - {b} THEN {max} ELSE {a} + {b} END")
}

/// A stored lot row as the model sees it; `None` for an unknown kind.
pub(in crate::ledger) fn stored_lot(row: credit_lot::Model) -> Option<Lot> {
    Some(Lot {
        id: LotRef::Stored(row.id),
        kind: LotKind::parse(&row.kind)?,
        allocated: row.allocated_micros,
        remaining: row.remaining_micros,
        expires_at: row.expires_at,
        created_at: row.created_at,
        source_type: row.source_type,
        source_id: row.source_id,
        dirty: false,
        settled: false,
    })
}

fn is_postgres(conn: &impl ConnectionTrait) -> bool {
    conn.get_database_backend() == DbBackend::Postgres
}

/// Locks the organizations' rows in id order, then loads what `wanted`
/// names as it stands under those locks.
pub(super) async fn lock_and_load(
    txn: &DatabaseTransaction,
    wanted: &Wanted,
) -> Result<(Vec<OrgRow>, Loaded), DbErr> {
    if is_postgres(txn) {
        postgres::lock_and_load(txn, wanted).await
    } else {
        portable::lock_and_load(txn, wanted).await
    }
}

/// Inserts new lots, returning their row ids in order.
pub(super) async fn insert_lots(
    txn: &DatabaseTransaction,
    lots: Vec<NewLot>,
) -> Result<Vec<i64>, DbErr> {
    // Rare (grants), so one portable statement per lot on both backends.
    portable::insert_lots(txn, lots).await
}

/// Writes `rows` (in a transaction, or autocommitted on PostgreSQL when
/// the organization rows carry [`Expected`] values).
pub(super) async fn write(
    txn: &impl ConnectionTrait,
    mut rows: Rows,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    // Admin writes only, so one portable statement on both backends.
    portable::insert_audits(txn, std::mem::take(&mut rows.audits)).await?;
    portable::settle_lots(txn, &std::mem::take(&mut rows.settled_lots)).await?;
    if is_postgres(txn) {
        postgres::write(txn, rows, now).await
    } else {
        portable::write(txn, rows, now).await
    }
}
