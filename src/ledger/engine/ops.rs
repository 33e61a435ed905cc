//! The ledger's write operations, their answers, and how each one applies
//! to an organization's book.

use std::collections::BTreeSet;

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::ActiveValue::Set;

use super::{batch::Extra, idempotency::IdemKey, new_id};
use crate::{
    entities::admin_audit,
    error::Result,
    ledger::{
        AdjustInput, AdjustOutcome, CommitInput, CommitOutcome, ConsumeInput, ConsumeOutcome,
        GrantInput, GrantOutcome, HoldAmount, ReleaseInput, ReleaseOutcome, ReserveInput,
        ReserveOutcome, SettleInput, SettleOutcome, TakeBackInput, TakeBackOutcome, VoidInput,
        VoidOutcome,
        model::{Book, EntryDetails, LotKind, Settled},
    },
};

/// One ledger write, as the writer queue carries it.
#[derive(Debug, Clone)]
pub enum Op {
    Consume(ConsumeInput),
    Reserve(ReserveInput),
    Commit(CommitInput),
    Release(ReleaseInput),
    Adjust(AdjustInput),
    Grant(GrantInput),
    Settle(SettleInput),
    Void(VoidInput),
    TakeBack(TakeBackInput),
    /// Only the sweep that every transaction does on load, for one
    /// organization (by row id).
    Sweep(i64),
}

impl Op {
    /// The operation's name, for spans and logs.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Op::Consume(_) => "consume",
            Op::Reserve(_) => "reserve",
            Op::Commit(_) => "commit",
            Op::Release(_) => "release",
            Op::Adjust(_) => "adjust",
            Op::Grant(_) => "grant",
            Op::Settle(_) => "settle",
            Op::Void(_) => "void",
            Op::TakeBack(_) => "take_back",
            Op::Sweep(_) => "sweep",
        }
    }

    /// The organization the caller named (external id); `None` for the
    /// operations that find theirs from a hold or carry a row id.
    pub(super) fn named_org(&self) -> Option<&str> {
        match self {
            Op::Consume(i) => Some(&i.org),
            Op::Reserve(i) => Some(&i.org),
            Op::Adjust(i) => Some(&i.org),
            Op::Grant(i) => Some(&i.org),
            Op::Settle(i) => Some(&i.org),
            Op::Void(i) => Some(&i.org),
            Op::TakeBack(i) => Some(&i.org),
            Op::Commit(_) | Op::Release(_) | Op::Sweep(_) => None,
        }
    }

    /// The hold the operation finishes (`Commit`, `Release`).
    pub(super) fn named_hold(&self) -> Option<&str> {
        match self {
            Op::Commit(i) => Some(&i.reservation_id),
            Op::Release(i) => Some(&i.reservation_id),
            Op::Consume(_)
            | Op::Reserve(_)
            | Op::Adjust(_)
            | Op::Grant(_)
            | Op::Settle(_)
            | Op::Void(_)
            | Op::TakeBack(_)
            | Op::Sweep(_) => None,
        }
    }
}

/// The answer to an [`Op`]: always the variant of the same name.
#[derive(Debug)]
pub enum Outcome {
    Consume(ConsumeOutcome),
    Reserve(ReserveOutcome),
    Commit(CommitOutcome),
    Release(ReleaseOutcome),
    Adjust(AdjustOutcome),
    Grant(GrantOutcome),
    Settle(SettleOutcome),
    Void(VoidOutcome),
    TakeBack(TakeBackOutcome),
    Swept,
}

/// An operation made ready for the transaction: its organization's row id,
/// its cost and its idempotency key resolved outside the transaction.
pub(super) struct Prepared {
    pub(super) org_id: i64,
    pub(super) op: Op,
    pub(super) cost: i64,
    pub(super) idem: Option<IdemKey>,
}

pub(super) fn apply_one(
    book: &mut Book,
    p: &Prepared,
    now: DateTime<Utc>,
    granted_sources: &mut BTreeSet<(String, String)>,
    extra: &mut Extra,
) -> Result<Outcome> {
    match &p.op {
        Op::Consume(i) => {
            let details = EntryDetails {
                description: i.description.clone().unwrap_or_else(|| {
                    default_usage_description(i.meter, i.quantity, i.model.as_deref())
                }),
                reference_type: Some("idempotency_key".into()),
                reference_id: Some(i.key.clone()),
                meter: Some(i.meter.as_str().into()),
                quantity: Some(i.quantity),
                model: i.model.clone(),
            };
            let entry = book.spend(new_id(), i.meter.transaction_type(), p.cost, details, now)?;
            let transaction_id = entry.id.clone();
            Ok(Outcome::Consume(ConsumeOutcome {
                transaction_id,
                charged_micros: p.cost,
                balance_micros: book.available(),
                duplicate: false,
            }))
        }
        Op::Reserve(i) => {
            let expires_at = now + TimeDelta::seconds(i.ttl_seconds);
            let usage = match &i.amount {
                HoldAmount::Micros(_) => (None, None, None),
                HoldAmount::Usage {
                    meter,
                    quantity,
                    model,
                } => (
                    Some(meter.as_str().to_owned()),
                    Some(*quantity),
                    model.clone(),
                ),
            };
            let hold = book.hold(new_id(), p.cost, expires_at, usage, now)?;
            Ok(Outcome::Reserve(ReserveOutcome {
                reservation_id: hold.id.clone(),
                held_micros: hold.held,
                expires_at,
                duplicate: false,
            }))
        }
        Op::Commit(i) => {
            let details = EntryDetails {
                description: i.description.clone().unwrap_or_else(|| {
                    default_usage_description(i.meter, i.quantity, i.model.as_deref())
                }),
                reference_type: Some("reservation".into()),
                reference_id: Some(i.reservation_id.clone()),
                meter: Some(i.meter.as_str().into()),
                quantity: Some(i.quantity),
                model: i.model.clone(),
            };
            let (transaction_id, charged, shortfall, released) =
                book.commit_hold(&i.reservation_id, new_id(), p.cost, details, now)?;
            Ok(Outcome::Commit(CommitOutcome {
                transaction_id,
                charged_micros: charged,
                shortfall_micros: shortfall,
                released_micros: released,
                balance_micros: book.available(),
            }))
        }
        Op::Release(i) => {
            let released = book.release_hold(&i.reservation_id)?;
            Ok(Outcome::Release(ReleaseOutcome {
                released_micros: released,
                balance_micros: book.available(),
            }))
        }
        Op::Adjust(i) => {
            let details = EntryDetails {
                description: i.reason.clone(),
                reference_type: Some("admin".into()),
                reference_id: Some(i.actor.clone()),
                ..EntryDetails::default()
            };
            let transaction_id = if i.amount > 0 {
                book.grant(
                    new_id(),
                    "manual",
                    LotKind::Manual,
                    i.amount,
                    i.expires_at,
                    ("manual".into(), None),
                    details,
                    now,
                )?
                .map(|e| e.id.clone())
                .unwrap_or_default()
            } else {
                book.spend(new_id(), "manual", -i.amount, details, now)?
                    .id
                    .clone()
            };
            extra.audits.push(admin_audit::ActiveModel {
                actor_sub: Set(i.actor.clone()),
                action: Set("manual_adjust".into()),
                target_org: Set(Some(i.org.clone())),
                reason: Set(i.reason.clone()),
                details: Set(serde_json::json!({
                    "target": i.org,
                    "before": null,
                    "after": {
                        "amount_micros": i.amount,
                        "transaction_id": transaction_id,
                        "expires_at": i.expires_at,
                        "idempotency_key": i.key,
                    },
                })
                .to_string()),
                created_at: Set(now),
                ..Default::default()
            });
            Ok(Outcome::Adjust(AdjustOutcome {
                transaction_id,
                balance_micros: book.available(),
                duplicate: false,
            }))
        }
        Op::Grant(i) => {
            let source = i
                .source_id
                .as_ref()
                .map(|id| (i.source_type.clone(), id.clone()));
            if let Some(source) = &source
                && granted_sources.contains(source)
            {
                return Ok(Outcome::Grant(GrantOutcome {
                    transaction_id: String::new(),
                    balance_micros: book.available(),
                    duplicate: true,
                }));
            }
            let details = EntryDetails {
                description: i.description.clone(),
                reference_type: Some(i.source_type.clone()),
                reference_id: i.source_id.clone(),
                ..EntryDetails::default()
            };
            let transaction_id = book
                .grant(
                    new_id(),
                    i.entry_kind,
                    i.lot_kind,
                    i.amount,
                    i.expires_at,
                    (i.source_type.clone(), i.source_id.clone()),
                    details,
                    now,
                )?
                .map(|e| e.id.clone())
                .unwrap_or_default();
            if let Some(source) = source {
                granted_sources.insert(source);
            }
            extra.side_writes.extend(i.then.iter().cloned());
            Ok(Outcome::Grant(GrantOutcome {
                transaction_id,
                balance_micros: book.available(),
                duplicate: false,
            }))
        }
        Op::Settle(i) => {
            let source = (i.source_type.clone(), i.source_id.clone());
            let details = EntryDetails {
                description: i.description.clone(),
                reference_type: Some(i.source_type.clone()),
                reference_id: Some(i.source_id.clone()),
                ..EntryDetails::default()
            };
            let settled = book.settle(
                new_id(),
                i.entry_kind,
                i.lot_kind,
                i.amount,
                i.expires_at,
                (&i.source_type, &i.source_id),
                granted_sources.contains(&source),
                details,
                now,
            )?;
            granted_sources.insert(source);
            extra.side_writes.extend(i.then.iter().cloned());
            let (transaction_id, settled_micros) = match settled {
                Settled::Granted {
                    transaction_id,
                    amount,
                } => (transaction_id, amount),
                Settled::Already => (String::new(), 0),
            };
            Ok(Outcome::Settle(SettleOutcome {
                transaction_id,
                settled_micros,
                balance_micros: book.available(),
                duplicate: false,
            }))
        }
        Op::Void(i) => {
            let voided_micros = book.void((&i.source_type, &i.source_id));
            extra.side_writes.extend(i.then.iter().cloned());
            Ok(Outcome::Void(VoidOutcome {
                voided_micros,
                duplicate: false,
            }))
        }
        Op::TakeBack(i) => {
            let details = EntryDetails {
                description: i.description.clone(),
                reference_type: Some(i.source_type.clone()),
                reference_id: Some(i.source_id.clone()),
                ..EntryDetails::default()
            };
            let taken = book.take_back(
                new_id(),
                i.amount,
                (&i.source_type, &i.source_id),
                details,
                now,
            )?;
            let (transaction_id, taken_micros) = match taken {
                Some((entry, taken)) => (entry.id.clone(), taken),
                None => (String::new(), 0),
            };
            extra.side_writes.extend(i.then.iter().cloned());
            Ok(Outcome::TakeBack(TakeBackOutcome {
                transaction_id,
                taken_micros,
                balance_micros: book.available(),
                duplicate: false,
            }))
        }
        Op::Sweep(_) => Ok(Outcome::Swept),
    }
}

fn default_usage_description(
    meter: crate::domain::Meter,
    quantity: i64,
    model: Option<&str>,
) -> String {
    let unit = match meter {
        crate::domain::Meter::StorageEgress => "bytes of storage egress",
        crate::domain::Meter::AiTokens => "AI tokens",
    };
    match model {
        Some(m) => format!("{quantity} {unit} ({m})"),
        None => format!("{quantity} {unit}"),
    }
}

/// Counts what a committed operation did to balances (Prometheus; see
/// [`crate::metrics`]). A duplicate changed nothing and counts nothing.
pub(super) fn observe(op: &Op, outcome: &Outcome) {
    use crate::metrics::{CREDITS_CONSUMED, CREDITS_GRANTED, CREDITS_REMOVED, HOLDS_OPENED};
    let positive = |micros: i64| u64::try_from(micros).unwrap_or(0);
    match op {
        Op::Consume(i) => {
            if let Outcome::Consume(o) = outcome
                && !o.duplicate
            {
                metrics::counter!(CREDITS_CONSUMED, "meter" => i.meter.as_str())
                    .increment(positive(o.charged_micros));
            }
        }
        Op::Commit(i) => {
            if let Outcome::Commit(o) = outcome {
                metrics::counter!(CREDITS_CONSUMED, "meter" => i.meter.as_str())
                    .increment(positive(o.charged_micros));
            }
        }
        Op::Reserve(_) => {
            if let Outcome::Reserve(o) = outcome
                && !o.duplicate
            {
                metrics::counter!(HOLDS_OPENED).increment(1);
            }
        }
        Op::Adjust(i) => {
            if let Outcome::Adjust(o) = outcome
                && !o.duplicate
            {
                if i.amount > 0 {
                    metrics::counter!(CREDITS_GRANTED, "kind" => LotKind::Manual.as_str())
                        .increment(positive(i.amount));
                } else {
                    metrics::counter!(CREDITS_REMOVED, "reason" => "adjustment")
                        .increment(i.amount.unsigned_abs());
                }
            }
        }
        Op::Grant(i) => {
            if let Outcome::Grant(o) = outcome
                && !o.duplicate
            {
                metrics::counter!(CREDITS_GRANTED, "kind" => i.lot_kind.as_str())
                    .increment(positive(i.amount));
            }
        }
        Op::Settle(i) => {
            if let Outcome::Settle(o) = outcome
                && !o.duplicate
            {
                metrics::counter!(CREDITS_GRANTED, "kind" => i.lot_kind.as_str())
                    .increment(positive(o.settled_micros));
            }
        }
        Op::Void(_) => {
            if let Outcome::Void(o) = outcome
                && !o.duplicate
            {
                metrics::counter!(CREDITS_REMOVED, "reason" => "void")
                    .increment(positive(o.voided_micros));
            }
        }
        Op::TakeBack(_) => {
            if let Outcome::TakeBack(o) = outcome
                && !o.duplicate
            {
                metrics::counter!(CREDITS_REMOVED, "reason" => "take_back")
                    .increment(positive(o.taken_micros));
            }
        }
        Op::Release(_) | Op::Sweep(_) => {}
    }
}
