//! The ledger's rules, pure: no I/O, no clock of its own.
//!
//! A [`Book`] is one organization's money as loaded under its row lock: the
//! committed balance, the credits held by open reservations, the lots that
//! still hold credits, and the writes made so far in this transaction. Every
//! operation first [`Book::sweep`]s what has expired, so the invariants hold
//! at every commit:
//!
//! * `balance` = Σ remaining of live (unexpired, non-pending) lots
//!   = Σ of the organization's ledger amounts;
//! * no lot below zero, no lot above its allocation;
//! * `held` = Σ of open, unexpired holds, and `held <= balance` at the
//!   moment each hold is made (spendable = `balance - held`).
//!
//! **Which lot is spent first** ([`spend_order`]): earliest expiry first,
//! lots without expiry last, then oldest first, then lowest id. `pending`
//! lots (payment not settled) are shown but never spent and are not part of
//! the balance.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

use crate::error::Error;

/// How a lot was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LotKind {
    Subscription,
    TopUp,
    Manual,
    Setup,
    Checkin,
    Coupon,
    Pending,
}

impl LotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::TopUp => "top_up",
            Self::Manual => "manual",
            Self::Setup => "setup",
            Self::Checkin => "checkin",
            Self::Coupon => "coupon",
            Self::Pending => "pending",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "subscription" => Self::Subscription,
            "top_up" => Self::TopUp,
            "manual" => Self::Manual,
            "setup" => Self::Setup,
            "checkin" => Self::Checkin,
            "coupon" => Self::Coupon,
            "pending" => Self::Pending,
            _ => return None,
        })
    }

    /// The display kind of `/user/credits/info` (seed 003).
    pub fn purchase_kind(self) -> &'static str {
        match self {
            Self::Subscription => "Subscription",
            Self::TopUp => "Top-up",
            Self::Manual | Self::Checkin | Self::Coupon => "Manual",
            Self::Setup => "Setup",
            Self::Pending => "Pending",
        }
    }
}

/// A lot as this transaction knows it: stored (with its row id) or created
/// in this transaction (numbered until it is inserted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LotRef {
    Stored(i64),
    New(usize),
}

#[derive(Debug, Clone)]
pub struct Lot {
    pub id: LotRef,
    pub kind: LotKind,
    pub allocated: i64,
    pub remaining: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub source_type: String,
    pub source_id: Option<String>,
    /// `remaining` changed in this transaction.
    pub dirty: bool,
}

impl Lot {
    fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    fn spendable(&self, now: DateTime<Utc>) -> bool {
        self.kind != LotKind::Pending && self.remaining > 0 && !self.expired(now)
    }
}

/// The order lots are spent in: earliest expiry first, no expiry last, then
/// oldest first, then lowest id (stored before new).
pub fn spend_order(a: &Lot, b: &Lot) -> Ordering {
    let expiry = match (a.expires_at, b.expires_at) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    let id_rank = |r: LotRef| match r {
        LotRef::Stored(id) => (0, id),
        LotRef::New(n) => (1, n as i64),
    };
    expiry
        .then(a.created_at.cmp(&b.created_at))
        .then(id_rank(a.id).cmp(&id_rank(b.id)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    Open,
    Committed,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => Self::Open,
            "committed" => Self::Committed,
            "released" => Self::Released,
            "expired" => Self::Expired,
            _ => return None,
        })
    }
}

/// A reservation as this transaction knows it.
#[derive(Debug, Clone)]
pub struct Hold {
    pub id: String,
    pub held: i64,
    pub status: HoldStatus,
    pub expires_at: DateTime<Utc>,
    pub meter: Option<String>,
    pub quantity: Option<i64>,
    pub model: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Created in this transaction (insert) rather than loaded (update).
    pub is_new: bool,
    /// Status changed in this transaction.
    pub finished: bool,
    pub transaction_id: Option<String>,
}

/// What a ledger row says beyond its amount.
#[derive(Debug, Clone, Default)]
pub struct EntryDetails {
    pub description: String,
    pub reference_type: Option<String>,
    pub reference_id: Option<String>,
    pub meter: Option<String>,
    pub quantity: Option<i64>,
    pub model: Option<String>,
}

/// A ledger row written by this transaction, with the lots it moved.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub seq: i64,
    pub kind: &'static str,
    pub amount: i64,
    pub balance_after: i64,
    pub details: EntryDetails,
    pub created_at: DateTime<Utc>,
    /// (lot, signed micros moved into it)
    pub allocations: Vec<(LotRef, i64)>,
}

/// One organization's money, loaded under its lock, plus this
/// transaction's writes.
#[derive(Debug, Clone)]
pub struct Book {
    pub org_id: i64,
    pub balance: i64,
    pub held: i64,
    pub seq: i64,
    /// Lots with credits left (stored) and lots created here.
    pub lots: Vec<Lot>,
    /// Open holds that have expired, and holds named by Commit/Release.
    pub holds: Vec<Hold>,
    pub entries: Vec<Entry>,
    next_new_lot: usize,
    /// Anything changed that must be written.
    pub touched: bool,
}

impl Book {
    pub fn new(
        org_id: i64,
        balance: i64,
        held: i64,
        seq: i64,
        lots: Vec<Lot>,
        holds: Vec<Hold>,
    ) -> Self {
        Self {
            org_id,
            balance,
            held,
            seq,
            lots,
            holds,
            entries: Vec::new(),
            next_new_lot: 0,
            touched: false,
        }
    }

    /// Credits that can be spent now: balance less open holds.
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }

    fn push_entry(
        &mut self,
        id: String,
        kind: &'static str,
        amount: i64,
        details: EntryDetails,
        allocations: Vec<(LotRef, i64)>,
        now: DateTime<Utc>,
    ) -> &Entry {
        self.seq += 1;
        self.balance += amount;
        self.touched = true;
        self.entries.push(Entry {
            id,
            seq: self.seq,
            kind,
            amount,
            balance_after: self.balance,
            details,
            created_at: now,
            allocations,
        });
        &self.entries[self.entries.len() - 1]
    }

    /// Turns expired lots' remainders into `expiry` rows and expired open
    /// holds into `expired`, so that what follows sees only live credits.
    pub fn sweep(&mut self, now: DateTime<Utc>, mut new_id: impl FnMut() -> String) {
        let mut expired: Vec<usize> = (0..self.lots.len())
            .filter(|&i| {
                let lot = &self.lots[i];
                lot.kind != LotKind::Pending && lot.remaining > 0 && lot.expired(now)
            })
            .collect();
        expired.sort_by(|&a, &b| spend_order(&self.lots[a], &self.lots[b]));
        for i in expired {
            let lot = &mut self.lots[i];
            let amount = lot.remaining;
            lot.remaining = 0;
            lot.dirty = true;
            let lot_ref = lot.id;
            let details = EntryDetails {
                description: format!("{} credits expired", lot.kind.as_str()),
                reference_type: Some("lot".into()),
                reference_id: match lot_ref {
                    LotRef::Stored(id) => Some(id.to_string()),
                    LotRef::New(_) => None,
                },
                ..EntryDetails::default()
            };
            self.push_entry(
                new_id(),
                "expiry",
                -amount,
                details,
                vec![(lot_ref, -amount)],
                now,
            );
        }
        for hold in &mut self.holds {
            if hold.status == HoldStatus::Open && hold.expires_at <= now {
                hold.status = HoldStatus::Expired;
                hold.finished = true;
                self.held -= hold.held;
                self.touched = true;
            }
        }
    }

    /// Takes `amount` from live lots in spend order. The caller has checked
    /// `amount <= available()`; a shortfall here is a broken invariant.
    fn take_from_lots(
        &mut self,
        amount: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<(LotRef, i64)>, Error> {
        let mut order: Vec<usize> = (0..self.lots.len())
            .filter(|&i| self.lots[i].spendable(now))
            .collect();
        order.sort_by(|&a, &b| spend_order(&self.lots[a], &self.lots[b]));
        let mut left = amount;
        let mut moved = Vec::new();
        for i in order {
            if left == 0 {
                break;
            }
            let lot = &mut self.lots[i];
            let take = left.min(lot.remaining);
            lot.remaining -= take;
            lot.dirty = true;
            left -= take;
            moved.push((lot.id, -take));
        }
        if left > 0 {
            return Err(Error::internal(format!(
                "ledger invariant broken for org {}: balance {} but lots short by {left}",
                self.org_id, self.balance
            )));
        }
        Ok(moved)
    }

    /// Spends `amount` (>= 0) as a `kind` row, failing with
    /// INSUFFICIENT_CREDITS (and changing nothing) beyond `available()`.
    pub fn spend(
        &mut self,
        id: String,
        kind: &'static str,
        amount: i64,
        details: EntryDetails,
        now: DateTime<Utc>,
    ) -> Result<&Entry, Error> {
        if amount > self.available() {
            return Err(Error::InsufficientCredits {
                needed_micros: amount,
                available_micros: self.available().max(0),
            });
        }
        let moved = self.take_from_lots(amount, now)?;
        Ok(self.push_entry(id, kind, -amount, details, moved, now))
    }

    /// Adds a lot of `amount`. A `pending` lot is only shown (no ledger row,
    /// no balance); any other kind is booked as a `kind` row.
    #[expect(
        clippy::too_many_arguments,
        reason = "a lot and its ledger row are made together"
    )]
    pub fn grant(
        &mut self,
        id: String,
        entry_kind: &'static str,
        lot_kind: LotKind,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        source: (String, Option<String>),
        details: EntryDetails,
        now: DateTime<Utc>,
    ) -> Option<&Entry> {
        let lot_ref = LotRef::New(self.next_new_lot);
        self.next_new_lot += 1;
        self.touched = true;
        self.lots.push(Lot {
            id: lot_ref,
            kind: lot_kind,
            allocated: amount,
            remaining: amount,
            expires_at,
            created_at: now,
            source_type: source.0,
            source_id: source.1,
            dirty: true,
        });
        if lot_kind == LotKind::Pending {
            return None;
        }
        Some(self.push_entry(
            id,
            entry_kind,
            amount,
            details,
            vec![(lot_ref, amount)],
            now,
        ))
    }

    /// Holds `amount` of the available credits.
    pub fn hold(
        &mut self,
        id: String,
        amount: i64,
        expires_at: DateTime<Utc>,
        usage: (Option<String>, Option<i64>, Option<String>),
        now: DateTime<Utc>,
    ) -> Result<&Hold, Error> {
        if amount > self.available() {
            return Err(Error::InsufficientCredits {
                needed_micros: amount,
                available_micros: self.available().max(0),
            });
        }
        self.held += amount;
        self.touched = true;
        self.holds.push(Hold {
            id,
            held: amount,
            status: HoldStatus::Open,
            expires_at,
            meter: usage.0,
            quantity: usage.1,
            model: usage.2,
            created_at: now,
            is_new: true,
            finished: false,
            transaction_id: None,
        });
        Ok(&self.holds[self.holds.len() - 1])
    }

    fn open_hold(&mut self, hold_id: &str) -> Result<usize, Error> {
        let index = self
            .holds
            .iter()
            .position(|h| h.id == hold_id)
            .ok_or(Error::ReservationNotFound)?;
        match self.holds[index].status {
            HoldStatus::Open => Ok(index),
            finished => Err(Error::ReservationFinished(finished.as_str().into())),
        }
    }

    /// Ends a hold and charges `cost`: the held part first, any excess from
    /// available credits, as much as there is. Returns (entry, charged,
    /// shortfall, released).
    pub fn commit_hold(
        &mut self,
        hold_id: &str,
        entry_id: String,
        cost: i64,
        details: EntryDetails,
        now: DateTime<Utc>,
    ) -> Result<(String, i64, i64, i64), Error> {
        let index = self.open_hold(hold_id)?;
        let held = self.holds[index].held;
        self.held -= held;
        let charge = cost.min(self.available().max(0));
        let shortfall = cost - charge;
        let released = (held - cost).max(0);
        let entry = self.spend(entry_id, "reservation", charge, details, now)?;
        let entry_id = entry.id.clone();
        let hold = &mut self.holds[index];
        hold.status = HoldStatus::Committed;
        hold.finished = true;
        hold.transaction_id = Some(entry_id.clone());
        Ok((entry_id, charge, shortfall, released))
    }

    /// Ends a hold without charging; returns what it released.
    pub fn release_hold(&mut self, hold_id: &str) -> Result<i64, Error> {
        let index = self.open_hold(hold_id)?;
        let hold = &mut self.holds[index];
        hold.status = HoldStatus::Released;
        hold.finished = true;
        let held = hold.held;
        self.held -= held;
        self.touched = true;
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    fn lot(id: i64, remaining: i64, expires: Option<i64>, created: i64) -> Lot {
        Lot {
            id: LotRef::Stored(id),
            kind: LotKind::TopUp,
            allocated: remaining,
            remaining,
            expires_at: expires.map(t),
            created_at: t(created),
            source_type: "test".into(),
            source_id: None,
            dirty: false,
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("tx{n}")
        }
    }

    #[test]
    fn spends_earliest_expiry_first_then_oldest_and_no_expiry_last() -> Result<(), Error> {
        let lots = vec![
            lot(1, 100, None, 0),
            lot(2, 100, Some(500), 10),
            lot(3, 100, Some(200), 20),
            lot(4, 100, Some(200), 5),
        ];
        let mut book = Book::new(1, 400, 0, 0, lots, vec![]);
        let mut id = ids();
        let entry = book.spend(id(), "ai_usage", 250, EntryDetails::default(), t(100))?;
        assert_eq!(
            entry.allocations,
            vec![
                (LotRef::Stored(4), -100),
                (LotRef::Stored(3), -100),
                (LotRef::Stored(2), -50)
            ]
        );
        assert_eq!(entry.balance_after, 150);
        Ok(())
    }

    #[test]
    fn expired_lots_are_never_spent_and_sweep_books_them() {
        let mut book = Book::new(
            1,
            300,
            0,
            7,
            vec![lot(1, 100, Some(50), 0), lot(2, 200, None, 0)],
            vec![],
        );
        let mut id = ids();
        book.sweep(t(60), &mut id);
        assert_eq!(book.balance, 200);
        assert_eq!(book.entries.len(), 1);
        assert_eq!(
            (
                book.entries[0].kind,
                book.entries[0].amount,
                book.entries[0].seq
            ),
            ("expiry", -100, 8)
        );
        let err = book.spend(id(), "ai_usage", 201, EntryDetails::default(), t(60));
        assert!(matches!(
            err,
            Err(Error::InsufficientCredits {
                available_micros: 200,
                ..
            })
        ));
        assert_eq!(book.balance, 200, "a refused spend changes nothing");
    }

    #[test]
    fn holds_reduce_available_and_commit_charges_excess_with_shortfall() -> Result<(), Error> {
        let mut book = Book::new(1, 100, 0, 0, vec![lot(1, 100, None, 0)], vec![]);
        let mut id = ids();
        book.hold("h1".into(), 60, t(300), (None, None, None), t(0))?;
        assert_eq!(book.available(), 40);
        assert!(
            book.spend(id(), "ai_usage", 41, EntryDetails::default(), t(1))
                .is_err()
        );
        // Actual cost 130: 60 from the hold, 40 more available, 30 short.
        let (_, charged, shortfall, released) =
            book.commit_hold("h1", id(), 130, EntryDetails::default(), t(2))?;
        assert_eq!((charged, shortfall, released), (100, 30, 0));
        assert_eq!((book.balance, book.held), (0, 0));
        assert!(matches!(
            book.release_hold("h1"),
            Err(Error::ReservationFinished(_))
        ));
        Ok(())
    }

    #[test]
    fn expired_holds_release_themselves_on_sweep() -> Result<(), Error> {
        let mut book = Book::new(1, 100, 0, 0, vec![lot(1, 100, None, 0)], vec![]);
        book.hold("h1".into(), 70, t(10), (None, None, None), t(0))?;
        book.sweep(t(10) + TimeDelta::seconds(1), ids());
        assert_eq!(book.available(), 100);
        assert!(
            matches!(book.release_hold("h1"), Err(Error::ReservationFinished(s)) if s == "expired")
        );
        Ok(())
    }

    #[test]
    fn pending_lots_are_shown_but_not_spent() {
        let mut book = Book::new(1, 0, 0, 0, vec![], vec![]);
        let entry = book.grant(
            "tx".into(),
            "purchase",
            LotKind::Pending,
            500,
            None,
            ("order".into(), Some("o1".into())),
            EntryDetails::default(),
            t(0),
        );
        assert!(entry.is_none());
        assert_eq!(book.balance, 0);
        assert!(
            book.spend("tx2".into(), "ai_usage", 1, EntryDetails::default(), t(1))
                .is_err()
        );
    }
}
