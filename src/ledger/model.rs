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
//!   moment each hold is made (spendable = `balance - held`, never below
//!   zero). Lots can expire under a hold, so `held` may later exceed
//!   `balance`: nothing is spendable then, and a Commit charges only what
//!   the balance still holds ([`Book::commit_hold`]);
//! * `balance` and every single amount stay within [`MAX_MICROS`]
//!   (10^12 credits): a grant past it is refused as bad input.
//!
//! An operation that is refused changes nothing: callers take a
//! [`Book::checkpoint`] before each operation and [`Book::restore`] it when
//! the operation fails, so a refusal can never leak state into its batch.
//!
//! **Which lot is spent first** ([`spend_order`]): earliest expiry first,
//! lots without expiry last, then oldest first, then lowest id. `pending`
//! lots (payment not settled) are shown but never spent and are not part of
//! the balance.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

use crate::{domain::MICROS_PER_CREDIT, error::Error};

/// The largest balance an organization may hold, and the largest single
/// amount: 10^12 credits in micro-credits.
pub const MAX_MICROS: i64 = 1_000_000_000_000_000_000;

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
    /// A `pending` lot settled in this transaction: its kind and expiry
    /// changed.
    pub settled: bool,
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
    /// What a committed hold charged.
    pub charged: Option<i64>,
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

fn past_the_limit() -> Error {
    Error::invalid(
        "amount",
        format!(
            "would take the balance past the limit of {} credits",
            MAX_MICROS / MICROS_PER_CREDIT
        ),
    )
}

/// What [`Book::settle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Credits became spendable: `amount` booked as `transaction_id`.
    Granted { transaction_id: String, amount: i64 },
    /// The source's credits were already spendable (or spent): nothing
    /// changed.
    Already,
}

/// What [`Book::checkpoint`] saves.
#[derive(Debug)]
pub struct Checkpoint {
    balance: i64,
    held: i64,
    seq: i64,
    lots: Vec<Lot>,
    holds: Vec<Hold>,
    entries: usize,
    next_new_lot: usize,
    touched: bool,
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

    /// Credits that can be spent now: balance less open holds, never
    /// below zero.
    pub fn available(&self) -> i64 {
        (self.balance - self.held).max(0)
    }

    /// The state an operation may change, to [`Book::restore`] if it fails.
    /// Entries are only ever appended, so their count is enough.
    pub fn checkpoint(&self) -> Checkpoint {
        let Self {
            org_id: _,
            balance,
            held,
            seq,
            lots,
            holds,
            entries,
            next_new_lot,
            touched,
        } = self;
        Checkpoint {
            balance: *balance,
            held: *held,
            seq: *seq,
            lots: lots.clone(),
            holds: holds.clone(),
            entries: entries.len(),
            next_new_lot: *next_new_lot,
            touched: *touched,
        }
    }

    /// Puts back what [`Book::checkpoint`] saved.
    pub fn restore(&mut self, saved: Checkpoint) {
        let Checkpoint {
            balance,
            held,
            seq,
            lots,
            holds,
            entries,
            next_new_lot,
            touched,
        } = saved;
        self.balance = balance;
        self.held = held;
        self.seq = seq;
        self.lots = lots;
        self.holds = holds;
        self.entries.truncate(entries);
        self.next_new_lot = next_new_lot;
        self.touched = touched;
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
                available_micros: self.available(),
            });
        }
        self.debit(id, kind, amount, details, now)
    }

    /// Takes `amount` (at most `balance`) from the lots as a `kind` row,
    /// whatever is held.
    fn debit(
        &mut self,
        id: String,
        kind: &'static str,
        amount: i64,
        details: EntryDetails,
        now: DateTime<Utc>,
    ) -> Result<&Entry, Error> {
        let moved = self.take_from_lots(amount, now)?;
        Ok(self.push_entry(id, kind, -amount, details, moved, now))
    }

    /// Adds a lot of `amount` (> 0). A `pending` lot is only shown (no
    /// ledger row, no balance); any other kind is booked as a `kind` row.
    /// Refused, as bad input naming `amount`, when the amount or the
    /// balance it leads to would pass [`MAX_MICROS`]; a lot that has
    /// already expired is refused naming `expires_at`.
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
    ) -> Result<Option<&Entry>, Error> {
        if amount <= 0 {
            return Err(Error::invalid("amount", "must be greater than 0"));
        }
        let counted = if lot_kind == LotKind::Pending {
            0
        } else {
            amount
        };
        if amount > MAX_MICROS {
            return Err(past_the_limit());
        }
        self.check_room(counted, expires_at, now)?;
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
            settled: false,
        });
        if lot_kind == LotKind::Pending {
            return Ok(None);
        }
        Ok(Some(self.push_entry(
            id,
            entry_kind,
            amount,
            details,
            vec![(lot_ref, amount)],
            now,
        )))
    }

    /// Whether `amount` more credits, expiring at `expires_at`, may be
    /// booked: bad input naming the field otherwise.
    fn check_room(
        &self,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        if self.balance.saturating_add(amount) > MAX_MICROS {
            return Err(past_the_limit());
        }
        if expires_at.is_some_and(|at| at <= now) {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        Ok(())
    }

    /// The live lot that `source` issued, if this book holds it.
    fn lot_of(&self, source: (&str, &str)) -> Option<usize> {
        self.lots
            .iter()
            .position(|l| l.source_type == source.0 && l.source_id.as_deref() == Some(source.1))
    }

    /// Makes the credits of `source` spendable, whatever state they are
    /// in: a `pending` lot of it becomes a `lot_kind` lot (expiring at
    /// `expires_at`) booked as an `entry_kind` row of its amount; when the
    /// source has issued no lot yet (`issued` false), a new lot of `amount`
    /// is granted; when it already issued a spendable one, nothing changes.
    #[expect(
        clippy::too_many_arguments,
        reason = "a lot and its ledger row are made together"
    )]
    pub fn settle(
        &mut self,
        id: String,
        entry_kind: &'static str,
        lot_kind: LotKind,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        source: (&str, &str),
        issued: bool,
        details: EntryDetails,
        now: DateTime<Utc>,
    ) -> Result<Settled, Error> {
        if lot_kind == LotKind::Pending {
            return Err(Error::internal("a lot cannot settle into a pending lot"));
        }
        match self.lot_of(source) {
            Some(i) if self.lots[i].kind == LotKind::Pending => {
                let lot = &self.lots[i];
                let (lot_ref, amount) = (lot.id, lot.remaining);
                self.check_room(amount, expires_at, now)?;
                let lot = &mut self.lots[i];
                lot.kind = lot_kind;
                lot.expires_at = expires_at;
                lot.settled = true;
                let entry = self.push_entry(
                    id,
                    entry_kind,
                    amount,
                    details,
                    vec![(lot_ref, amount)],
                    now,
                );
                Ok(Settled::Granted {
                    transaction_id: entry.id.clone(),
                    amount,
                })
            }
            Some(_) => Ok(Settled::Already),
            None if issued => Ok(Settled::Already),
            None => {
                let source = (source.0.to_owned(), Some(source.1.to_owned()));
                let entry = self.grant(
                    id, entry_kind, lot_kind, amount, expires_at, source, details, now,
                )?;
                Ok(Settled::Granted {
                    transaction_id: entry.map(|e| e.id.clone()).unwrap_or_default(),
                    amount,
                })
            }
        }
    }

    /// Removes the credits of `source`'s `pending` lot (a payment that
    /// failed): they were never part of the balance, so no ledger row.
    /// Returns what was removed; 0 when the source has no pending lot.
    pub fn void(&mut self, source: (&str, &str)) -> i64 {
        match self.lot_of(source) {
            Some(i) if self.lots[i].kind == LotKind::Pending => {
                let lot = &mut self.lots[i];
                let voided = lot.remaining;
                lot.remaining = 0;
                lot.dirty = true;
                self.touched = true;
                voided
            }
            Some(_) | None => 0,
        }
    }

    /// Takes up to `amount` back from the spendable lot `source` issued
    /// (a refund, a lost dispute), never more than the lot has left and
    /// never below a zero balance, as a `refund` row. Returns the row and
    /// what it took; `None` when there is nothing left to take.
    pub fn take_back(
        &mut self,
        id: String,
        amount: i64,
        source: (&str, &str),
        details: EntryDetails,
        now: DateTime<Utc>,
    ) -> Result<Option<(&Entry, i64)>, Error> {
        if amount <= 0 || amount > MAX_MICROS {
            return Err(Error::invalid(
                "amount",
                format!("must be between 1 and {} micro-credits", MAX_MICROS),
            ));
        }
        let Some(i) = self.lot_of(source) else {
            return Ok(None);
        };
        let lot = &self.lots[i];
        if !lot.spendable(now) {
            return Ok(None);
        }
        let take = amount.min(lot.remaining).min(self.balance.max(0));
        if take == 0 {
            return Ok(None);
        }
        let lot = &mut self.lots[i];
        lot.remaining -= take;
        lot.dirty = true;
        let lot_ref = lot.id;
        let entry = self.push_entry(id, "refund", -take, details, vec![(lot_ref, -take)], now);
        Ok(Some((entry, take)))
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
                available_micros: self.available(),
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
            charged: None,
        });
        Ok(&self.holds[self.holds.len() - 1])
    }

    fn open_hold(&mut self, hold_id: &str) -> Result<usize, Error> {
        let index = self
            .holds
            .iter()
            .position(|h| h.id == hold_id)
            .ok_or(Error::ReservationNotFound)?;
        let hold = &self.holds[index];
        match hold.status {
            HoldStatus::Open => Ok(index),
            HoldStatus::Committed => Err(Error::ReservationFinished {
                status: HoldStatus::Committed.as_str(),
                transaction_id: hold.transaction_id.clone(),
                charged_micros: hold.charged,
            }),
            finished @ (HoldStatus::Released | HoldStatus::Expired) => {
                Err(Error::ReservationFinished {
                    status: finished.as_str(),
                    transaction_id: None,
                    charged_micros: None,
                })
            }
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
        // The held part is covered by the hold, as far as the balance
        // still goes (lots may have expired under it); only the excess
        // competes with everyone else for what is available.
        let from_hold = cost.min(held).min(self.balance.max(0));
        let excess = (cost - held).max(0).min(self.available());
        let charge = from_hold + excess;
        let shortfall = cost - charge;
        let released = (held - cost).max(0);
        self.held -= held;
        let entry = self.debit(entry_id, "reservation", charge, details, now)?;
        let entry_id = entry.id.clone();
        let hold = &mut self.holds[index];
        hold.status = HoldStatus::Committed;
        hold.finished = true;
        hold.transaction_id = Some(entry_id.clone());
        hold.charged = Some(charge);
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
            settled: false,
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
            Err(Error::ReservationFinished {
                status: "committed",
                charged_micros: Some(100),
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn expired_holds_release_themselves_on_sweep() -> Result<(), Error> {
        let mut book = Book::new(1, 100, 0, 0, vec![lot(1, 100, None, 0)], vec![]);
        book.hold("h1".into(), 70, t(10), (None, None, None), t(0))?;
        book.sweep(t(10) + TimeDelta::seconds(1), ids());
        assert_eq!(book.available(), 100);
        assert!(matches!(
            book.release_hold("h1"),
            Err(Error::ReservationFinished {
                status: "expired",
                ..
            })
        ));
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
        assert!(matches!(entry, Ok(None)));
        assert_eq!(book.balance, 0);
        assert!(
            book.spend("tx2".into(), "ai_usage", 1, EntryDetails::default(), t(1))
                .is_err()
        );
    }

    #[test]
    fn commit_after_the_lots_expired_charges_what_is_left() -> Result<(), Error> {
        // 10 credits expiring at t(5), held 6 + 4; the lot expires; the
        // first hold commits its full cost.
        let mut book = Book::new(1, 10, 0, 0, vec![lot(1, 10, Some(5), 0)], vec![]);
        let mut id = ids();
        book.hold("h1".into(), 6, t(300), (None, None, None), t(0))?;
        book.hold("h2".into(), 4, t(300), (None, None, None), t(0))?;
        book.sweep(t(6), &mut id);
        assert_eq!((book.balance, book.held, book.available()), (0, 10, 0));
        let (_, charged, shortfall, released) =
            book.commit_hold("h1", id(), 6, EntryDetails::default(), t(6))?;
        assert_eq!((charged, shortfall, released), (0, 6, 0));
        assert_eq!((book.balance, book.held), (0, 4));
        // Half the credits left: the hold is charged from them first.
        let mut book = Book::new(
            1,
            10,
            0,
            0,
            vec![lot(1, 5, Some(5), 0), lot(2, 5, None, 0)],
            vec![],
        );
        book.hold("h1".into(), 6, t(300), (None, None, None), t(0))?;
        book.hold("h2".into(), 4, t(300), (None, None, None), t(0))?;
        book.sweep(t(6), &mut id);
        let (_, charged, shortfall, _) =
            book.commit_hold("h1", id(), 8, EntryDetails::default(), t(6))?;
        assert_eq!((charged, shortfall), (5, 3));
        assert_eq!((book.balance, book.held, book.available()), (0, 4, 0));
        Ok(())
    }

    #[test]
    fn a_restored_checkpoint_undoes_a_refused_operation() -> Result<(), Error> {
        let mut book = Book::new(1, 10, 0, 3, vec![lot(1, 10, None, 0)], vec![]);
        book.hold("h1".into(), 4, t(300), (None, None, None), t(0))?;
        let saved = book.checkpoint();
        let before = (book.balance, book.held, book.seq, book.entries.len());
        book.spend("x".into(), "ai_usage", 2, EntryDetails::default(), t(1))?;
        book.release_hold("h1")?;
        book.restore(saved);
        assert_eq!(
            (book.balance, book.held, book.seq, book.entries.len()),
            before
        );
        assert_eq!(book.lots[0].remaining, 10);
        assert_eq!(book.holds[0].status, HoldStatus::Open);
        Ok(())
    }

    #[test]
    fn grants_past_the_bound_or_already_expired_are_refused() {
        let mut book = Book::new(1, 0, 0, 0, vec![], vec![]);
        let grant = |book: &mut Book, amount: i64, expires: Option<i64>| {
            book.grant(
                "g".into(),
                "manual",
                LotKind::Manual,
                amount,
                expires.map(t),
                ("manual".into(), None),
                EntryDetails::default(),
                t(10),
            )
            .map(|e| e.map(|e| e.balance_after))
        };
        assert!(matches!(
            grant(&mut book, MAX_MICROS, None),
            Ok(Some(MAX_MICROS))
        ));
        assert!(matches!(
            grant(&mut book, 1, None),
            Err(Error::InvalidArgument { field, .. }) if field == "amount"
        ));
        let mut book = Book::new(1, 0, 0, 0, vec![], vec![]);
        assert!(matches!(
            grant(&mut book, MAX_MICROS + 1, None),
            Err(Error::InvalidArgument { field, .. }) if field == "amount"
        ));
        assert!(matches!(
            grant(&mut book, 5, Some(10)),
            Err(Error::InvalidArgument { field, .. }) if field == "expires_at"
        ));
    }

    fn sourced(mut l: Lot, kind: LotKind, source: &str) -> Lot {
        l.kind = kind;
        l.source_type = "order".into();
        l.source_id = Some(source.into());
        l
    }

    #[test]
    fn a_pending_lot_settles_once_in_place() -> Result<(), Error> {
        let pending = sourced(lot(1, 50, None, 0), LotKind::Pending, "o1");
        let mut book = Book::new(1, 10, 0, 1, vec![lot(2, 10, None, 0), pending], vec![]);
        let settle = |book: &mut Book, issued: bool| {
            book.settle(
                "s".into(),
                "purchase",
                LotKind::TopUp,
                50,
                Some(t(100)),
                ("order", "o1"),
                issued,
                EntryDetails::default(),
                t(1),
            )
        };
        assert_eq!(
            settle(&mut book, true)?,
            Settled::Granted {
                transaction_id: "s".into(),
                amount: 50
            }
        );
        let lot = &book.lots[1];
        assert_eq!(
            (lot.kind, lot.settled, lot.expires_at),
            (LotKind::TopUp, true, Some(t(100)))
        );
        assert_eq!((book.balance, book.seq), (60, 2));
        assert_eq!(settle(&mut book, true)?, Settled::Already);
        assert_eq!(book.balance, 60);
        Ok(())
    }

    #[test]
    fn a_source_without_a_lot_is_granted_and_a_voided_one_never_settles() -> Result<(), Error> {
        let mut book = Book::new(1, 0, 0, 0, vec![], vec![]);
        let settle = |book: &mut Book, issued: bool| {
            book.settle(
                "s".into(),
                "purchase",
                LotKind::TopUp,
                20,
                None,
                ("order", "o2"),
                issued,
                EntryDetails::default(),
                t(1),
            )
        };
        assert!(matches!(
            settle(&mut book, false)?,
            Settled::Granted { amount: 20, .. }
        ));
        assert_eq!(book.balance, 20);
        // A voided pending lot has nothing left; its source has issued.
        let mut book = Book::new(
            1,
            0,
            0,
            0,
            vec![sourced(lot(1, 30, None, 0), LotKind::Pending, "o2")],
            vec![],
        );
        assert_eq!(book.void(("order", "o2")), 30);
        assert_eq!(book.void(("order", "o2")), 0);
        assert_eq!((book.balance, book.lots[0].remaining), (0, 0));
        assert!(book.entries.is_empty(), "pending credits were never booked");
        Ok(())
    }

    #[test]
    fn taking_back_stops_at_the_lot_and_the_balance() -> Result<(), Error> {
        let paid = sourced(lot(1, 40, None, 0), LotKind::TopUp, "o1");
        let mut book = Book::new(1, 50, 0, 0, vec![paid, lot(2, 10, None, 0)], vec![]);
        let take = |book: &mut Book, amount: i64| {
            book.take_back(
                "r".into(),
                amount,
                ("order", "o1"),
                EntryDetails::default(),
                t(1),
            )
            .map(|r| r.map(|(_, taken)| taken))
        };
        assert_eq!(take(&mut book, 15)?, Some(15));
        assert_eq!(
            take(&mut book, 100)?,
            Some(25),
            "only what the lot has left"
        );
        assert_eq!(take(&mut book, 1)?, None);
        assert_eq!((book.balance, book.lots[1].remaining), (10, 10));
        // Never below a zero balance (lots and balance disagree only if
        // corrupted, but the bound holds regardless).
        let paid = sourced(lot(1, 40, None, 0), LotKind::TopUp, "o1");
        let mut book = Book::new(1, 5, 0, 0, vec![paid], vec![]);
        assert_eq!(take(&mut book, 40)?, Some(5));
        assert!(matches!(
            take(&mut book, 0),
            Err(Error::InvalidArgument { .. })
        ));
        Ok(())
    }
}
