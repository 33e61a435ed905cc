//! The credit ledger: the money core. Knows nothing of gRPC or HTTP.
//!
//! * [`model`]: the rules, pure (which lot is spent first, expiry, holds).
//! * [`engine`]: every write, as one database transaction per batch: lock
//!   the organizations' rows in id order, load their books, apply each
//!   operation through the model, write all changes, commit. Concurrent
//!   callers are gathered into batches (group commit), each keeping its own
//!   answer and idempotency record.
//! * `store`: the batch's rows in and out of the database (a PostgreSQL
//!   fast path of two fixed statements per batch, and a portable path).
//! * [`reads`]: balances, the ledger listing, monthly statistics, lot detail.
//! * `balance`: the balance cache most reads are served from, exact for
//!   this process's writes and, on PostgreSQL, told of other replicas'
//!   writes by notification (stale for at most [`MAX_AGE_SHARED`]).
//! * [`sweeper`]: the background task that books expiries for organizations
//!   nobody writes to (writers sweep their own organizations first).
//!
//! Capabilities that sell credits build on [`GrantInput`], [`SettleInput`],
//! [`VoidInput`] and [`TakeBackInput`], each idempotent on its source or key,
//! and may attach [`SideWrite`]s that commit in the same transaction.
//!
//! Safety across replicas rests on the database: organization rows are
//! locked `FOR UPDATE` (PostgreSQL) or written by one writer at a time
//! (SQLite); idempotency keys, ledger sequence numbers and lot sources are
//! unique; lots and balances cannot go below zero.

mod balance;
pub mod engine;
pub mod model;
mod rates;
pub mod reads;
mod store;
pub mod sweeper;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use balance::MAX_AGE_SHARED;
pub use engine::{BatchCounts, Ledger, Op, Outcome};
pub use model::LotKind;
pub use rates::Rates;

use crate::domain::Meter;

/// Charge usage now (`UsageService.Consume`).
#[derive(Debug, Clone)]
pub struct ConsumeInput {
    pub org: String,
    pub meter: Meter,
    pub quantity: i64,
    pub model: Option<String>,
    pub key: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsumeOutcome {
    pub transaction_id: String,
    pub charged_micros: i64,
    pub balance_micros: i64,
    #[serde(skip)]
    pub duplicate: bool,
}

/// What a hold is for: a fixed amount, or the cost of some usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldAmount {
    Micros(i64),
    Usage {
        meter: Meter,
        quantity: i64,
        model: Option<String>,
    },
}

/// Hold credits (`UsageService.Reserve`).
#[derive(Debug, Clone)]
pub struct ReserveInput {
    pub org: String,
    pub amount: HoldAmount,
    pub ttl_seconds: i64,
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReserveOutcome {
    pub reservation_id: String,
    pub held_micros: i64,
    pub expires_at: DateTime<Utc>,
    #[serde(skip)]
    pub duplicate: bool,
}

/// Charge the actual cost of a hold (`UsageService.Commit`).
#[derive(Debug, Clone)]
pub struct CommitInput {
    pub reservation_id: String,
    pub meter: Meter,
    pub quantity: i64,
    pub model: Option<String>,
    pub description: Option<String>,
    /// When set (role `service` names the org), the hold must belong to it.
    pub org: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    pub transaction_id: String,
    pub charged_micros: i64,
    pub shortfall_micros: i64,
    pub released_micros: i64,
    pub balance_micros: i64,
}

/// Free a hold (`UsageService.Release`).
#[derive(Debug, Clone)]
pub struct ReleaseInput {
    pub reservation_id: String,
    pub org: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseOutcome {
    pub released_micros: i64,
    pub balance_micros: i64,
}

/// A manual adjustment by an admin (`AdminService.ManualAdjust`).
#[derive(Debug, Clone)]
pub struct AdjustInput {
    pub org: String,
    /// Non-zero: positive grants a `manual` lot, negative debits lots.
    pub amount: i64,
    pub reason: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub key: Option<String>,
    /// The admin's `sub`, for the audit log.
    pub actor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdjustOutcome {
    pub transaction_id: String,
    pub balance_micros: i64,
    #[serde(skip)]
    pub duplicate: bool,
}

/// A row write of another capability (an order's status, a webhook's
/// record) made in the ledger's own transaction, after the ledger rows, so
/// that it and the credits it goes with commit together or not at all.
///
/// With `expect_rows`, the statement must touch exactly that many rows or
/// the whole transaction is rolled back and the operation answers
/// `UNAVAILABLE` (safe to retry): a guard such as "the order is still
/// pending" or "its refunded amount is still what I read" that a
/// concurrent writer may have changed. A replayed operation (its
/// idempotency record already stored) runs no side writes: they committed
/// with the first run.
#[derive(Debug, Clone)]
pub struct SideWrite {
    pub statement: sea_orm::Statement,
    pub expect_rows: Option<u64>,
}

/// Credits granted by a capability (check-in, coupon, payment…): a lot of
/// `lot_kind` booked as an `entry_kind` row. A `source_id` is unique per
/// `source_type`, so a source grants at most once whatever the retries, and
/// a repeated grant answers the first one's transaction id.
#[derive(Debug, Clone)]
pub struct GrantInput {
    pub org: String,
    pub entry_kind: &'static str,
    pub lot_kind: LotKind,
    pub amount: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub source_type: String,
    pub source_id: Option<String>,
    pub description: String,
    pub then: Vec<SideWrite>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantOutcome {
    /// Empty for a `pending` lot (no ledger row until it settles).
    pub transaction_id: String,
    pub balance_micros: i64,
    /// The source had already granted: nothing was written.
    #[serde(skip)]
    pub duplicate: bool,
}

/// Makes a source's credits spendable: its `pending` lot becomes a
/// `lot_kind` lot booked as an `entry_kind` row; a source with no lot yet
/// gets a new one of `amount`; a source whose credits are already
/// spendable changes nothing. Idempotent on the source.
#[derive(Debug, Clone)]
pub struct SettleInput {
    pub org: String,
    pub entry_kind: &'static str,
    pub lot_kind: LotKind,
    pub amount: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub source_type: String,
    pub source_id: String,
    pub description: String,
    pub then: Vec<SideWrite>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SettleOutcome {
    /// Empty when the credits were already spendable before this source
    /// was first settled through the ledger.
    pub transaction_id: String,
    pub settled_micros: i64,
    pub balance_micros: i64,
    #[serde(skip)]
    pub duplicate: bool,
}

/// Removes a source's `pending` lot (the payment failed). Idempotent on
/// the source.
#[derive(Debug, Clone)]
pub struct VoidInput {
    pub org: String,
    pub source_type: String,
    pub source_id: String,
    pub then: Vec<SideWrite>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VoidOutcome {
    pub voided_micros: i64,
    #[serde(skip)]
    pub duplicate: bool,
}

/// Takes credits back from the lot a source issued (refund, lost
/// dispute): at most `amount`, never more than the lot has left, never
/// below a zero balance. Idempotent on `key`, which names this take-back
/// (e.g. the refund and the cumulative amount it brings the order to).
#[derive(Debug, Clone)]
pub struct TakeBackInput {
    pub org: String,
    pub source_type: String,
    pub source_id: String,
    pub amount: i64,
    pub key: String,
    pub description: String,
    pub then: Vec<SideWrite>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeBackOutcome {
    /// Empty when nothing was left to take.
    pub transaction_id: String,
    pub taken_micros: i64,
    pub balance_micros: i64,
    #[serde(skip)]
    pub duplicate: bool,
}
