//! An organization's balance as reads report it, and the exact balance
//! cache of a single-writer (SQLite) process: the ledger's write side
//! bumps an organization's version after every write transaction, and
//! [`super::reads::balance`] keeps what it read only if no write happened
//! meanwhile.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balance {
    /// The committed ledger balance (live lots).
    pub stored: i64,
    /// Credits held by open, unexpired reservations.
    pub realtime: i64,
    /// Usage this calendar month, by meter.
    pub storage_egress: i64,
    pub ai_tokens: i64,
    pub period_start: DateTime<Utc>,
}

impl Balance {
    /// What can be spent now (never negative).
    pub fn available(&self) -> i64 {
        (self.stored - self.realtime).max(0)
    }
}

/// Per organization: a version bumped by every write transaction, and the
/// balance last read at that version with the instant it stops being true
/// (the next expiry of a lot or hold, or the month's end).
#[derive(Default)]
pub(crate) struct BalanceCache {
    entries: HashMap<i64, (u64, Option<CachedBalance>)>,
}

/// A balance and the instant it stops being true.
type CachedBalance = (Balance, DateTime<Utc>);

impl BalanceCache {
    pub(crate) fn version(&self, org: i64) -> u64 {
        self.entries.get(&org).map_or(0, |e| e.0)
    }

    pub(crate) fn get(&self, org: i64, now: DateTime<Utc>) -> Option<Balance> {
        match self.entries.get(&org) {
            Some((_, Some((balance, until)))) if now < *until => Some(balance.clone()),
            _ => None,
        }
    }

    /// Keeps `balance` only if no write happened since `version` was read.
    pub(crate) fn put(&mut self, org: i64, version: u64, balance: Balance, until: DateTime<Utc>) {
        let entry = self.entries.entry(org).or_insert((0, None));
        if entry.0 == version {
            entry.1 = Some((balance, until));
        }
    }

    pub(super) fn invalidate(&mut self, org: i64) {
        let entry = self.entries.entry(org).or_insert((0, None));
        entry.0 += 1;
        entry.1 = None;
    }
}
