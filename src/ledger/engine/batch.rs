//! One batch inside its transaction: lock and load the organizations'
//! books, apply each operation in arrival order, turn what changed into
//! rows and write them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Datelike, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};

use super::{
    idempotency::{IdemKey, replay, stored_response},
    new_id,
    ops::{Op, Outcome, Prepared, apply_one},
};
use crate::{
    entities::{admin_audit, ledger_transaction, reservation},
    error::{Error, Result},
    ledger::{
        ConsumeOutcome,
        model::{Book, Hold, HoldStatus, Lot, LotRef},
        store::{
            self, Allocation, FinishedHold, IdemRow, KeyRef, LotUpdate, MonthlyRow, NewLot, OrgRow,
            Rows, SettledLot, SourceRef, Wanted,
        },
    },
};

pub(super) enum BatchError {
    /// The database failed and nothing was written: maybe transient.
    Db(DbErr),
    /// An autocommitted write's connection failed while it ran: it may
    /// have committed.
    Unknown(DbErr),
    /// A broken invariant: never retried, nothing written.
    Rule(Error),
}

impl From<DbErr> for BatchError {
    fn from(e: DbErr) -> Self {
        Self::Db(e)
    }
}

/// The `ledger_monthly` bucket of a ledger row: its type, except that a
/// committed hold is usage of its meter and is summed with that meter's
/// `Consume` rows (consumption by meter reads one bucket per meter).
fn monthly_bucket(e: &crate::ledger::model::Entry) -> &'static str {
    match (e.kind, e.details.meter.as_deref()) {
        ("reservation", Some(meter)) => meter
            .parse::<crate::domain::Meter>()
            .map_or(e.kind, crate::domain::Meter::transaction_type),
        _ => e.kind,
    }
}

fn month_key(t: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", t.year(), t.month())
}

/// What the batch writes besides the books.
#[derive(Default)]
pub(super) struct Extra {
    /// Idempotency records of every keyed method but `Consume`.
    pub(super) idempotency: Vec<(IdemKey, String)>,
    /// The `Consume`s of the batch, by ledger row id.
    pub(super) consume_keys: HashMap<String, ConsumeKey>,
    pub(super) audits: Vec<admin_audit::ActiveModel>,
    pub(super) side_writes: Vec<crate::ledger::SideWrite>,
}

/// What a `Consume`'s ledger row adds to be its own idempotency record:
/// the request's fingerprint (the key is already the row's
/// `reference_id`) and the available balance the call answered. With the
/// row's id and amount, that is the whole first answer.
pub(super) struct ConsumeKey {
    pub(super) hash: String,
    pub(super) available_after: i64,
}

/// What a batch leaves behind: each operation's answer, and for each
/// organization the state a later batch may start from without loading
/// (see [`Warm`]), or `None` when it must load.
pub(super) struct Applied {
    pub(super) outcomes: Vec<Result<Outcome>>,
    pub(super) warm: Vec<(i64, Option<Warm>)>,
}

/// An organization's state as this worker's last committed batch left it,
/// when that state is all a `Consume` needs: no open holds, every lot with
/// credits left known by row id. A batch that starts from it skips the
/// lock-and-load statement and writes in one autocommitted statement that
/// changes nothing unless the organization row still holds exactly this
/// balance, held amount and sequence number (every write of an
/// organization's credits moves one of them), so a write by anyone else
/// meanwhile sends the batch back to the locking path.
#[derive(Clone)]
pub(super) struct Warm {
    balance: i64,
    seq: i64,
    lots: Vec<Lot>,
}

impl Warm {
    /// The state `book` leaves, if a later batch may start from it.
    fn of(book: &Book) -> Option<Self> {
        let known = book.held == 0
            && book.holds.is_empty()
            && book.lots.iter().all(|l| matches!(l.id, LotRef::Stored(_)));
        known.then(|| Self {
            balance: book.balance,
            seq: book.seq,
            lots: book
                .lots
                .iter()
                .filter(|l| l.remaining > 0)
                .map(|l| Lot {
                    dirty: false,
                    settled: false,
                    ..l.clone()
                })
                .collect(),
        })
    }
}

/// Where a batch's books come from, and so how it writes.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// Locked and loaded inside the batch's transaction.
    Locked(&'a DatabaseTransaction),
    /// This worker's [`Warm`] states (PostgreSQL, `Consume` only); the
    /// write is autocommitted on `db` and checked against them.
    Warm(&'a DatabaseConnection, &'a HashMap<i64, Warm>),
}

pub(super) async fn apply_batch(
    source: Source<'_>,
    ops: &[Prepared],
    now: DateTime<Utc>,
) -> Result<Applied, BatchError> {
    let (mut books, idem_seen, granted_sources) = match source {
        Source::Locked(txn) => load(txn, ops, now).await?,
        Source::Warm(_, warm) => {
            let mut books = BTreeMap::new();
            for (&org_id, w) in warm {
                let mut book = Book::new(org_id, w.balance, 0, w.seq, w.lots.clone(), Vec::new());
                book.sweep(now, new_id);
                books.insert(org_id, book);
            }
            // The keys are taken to be new: a stored one makes the write
            // fail (on the unique index of `Consume` keys, or on the
            // statement's probe of the records table), and the batch runs
            // again locked.
            (books, HashMap::new(), BTreeSet::new())
        }
    };
    let (outcomes, extra) = apply_all(&mut books, idem_seen, granted_sources, ops, now)?;
    if matches!(source, Source::Warm(..)) && outcomes.iter().any(Result::is_err) {
        // A refusal may rest on a state another replica has moved on from
        // (a grant it acknowledged): only a locked load may refuse.
        return Err(BatchError::Db(DbErr::Custom(
            "a warm batch refused an operation; running it locked".into(),
        )));
    }
    write_batch(source, &books, extra, now).await?;
    let warm = books.values().map(|b| (b.org_id, Warm::of(b))).collect();
    Ok(Applied { outcomes, warm })
}

type IdemSeen = HashMap<(i64, &'static str, String), (String, String)>;

/// Steps 1 and 2: lock the organizations and load their books.
async fn load(
    txn: &DatabaseTransaction,
    ops: &[Prepared],
    now: DateTime<Utc>,
) -> Result<(BTreeMap<i64, Book>, IdemSeen, BTreeSet<(String, String)>), BatchError> {
    let org_ids: Vec<i64> = ops
        .iter()
        .map(|p| p.org_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    // 1. Lock the organizations, in id order; 2. load their live lots,
    //    the holds that matter, the idempotency records, the grants'
    //    sources, as they stand under the locks.
    let wanted = Wanted {
        org_ids,
        named_holds: ops
            .iter()
            .filter_map(|p| p.op.named_hold().map(str::to_owned))
            .collect(),
        keys: ops
            .iter()
            .filter_map(|p| {
                p.idem.as_ref().map(|k| KeyRef {
                    org_id: k.org_id,
                    method: k.method,
                    key: k.key.clone(),
                })
            })
            .collect(),
        sources: ops
            .iter()
            .filter_map(|p| match &p.op {
                Op::Grant(i) => i.source_id.clone().map(|source_id| SourceRef {
                    source_type: i.source_type.clone(),
                    source_id,
                }),
                Op::Settle(i) => Some(SourceRef {
                    source_type: i.source_type.clone(),
                    source_id: i.source_id.clone(),
                }),
                Op::Consume(_)
                | Op::Void(_)
                | Op::TakeBack(_)
                | Op::Reserve(_)
                | Op::Commit(_)
                | Op::Release(_)
                | Op::Adjust(_)
                | Op::Sweep(_) => None,
            })
            .collect(),
        now,
    };
    let (orgs, loaded) = store::lock_and_load(txn, &wanted).await?;
    let mut idem_seen: IdemSeen = HashMap::new();
    for r in loaded.idempotency {
        let method = match r.method.as_str() {
            store::CONSUME_METHOD => store::CONSUME_METHOD,
            "reserve" => "reserve",
            "manual_adjust" => "manual_adjust",
            "grant" => "grant",
            "settle" => "settle",
            "void" => "void",
            "take_back" => "take_back",
            _ => continue,
        };
        idem_seen.insert((r.org_id, method, r.key), (r.request_hash, r.response));
    }
    for r in loaded.consume_keys {
        let answer = Outcome::Consume(ConsumeOutcome {
            transaction_id: r.transaction_id,
            charged_micros: r.charged_micros,
            balance_micros: r.available_after_micros,
            duplicate: false,
        });
        let response = stored_response(&answer).map_err(BatchError::Rule)?;
        idem_seen.insert(
            (r.org_id, store::CONSUME_METHOD, r.key),
            (r.request_hash, response),
        );
    }
    let granted_sources = loaded.sources;

    let mut lots_by_org: HashMap<i64, Vec<Lot>> = HashMap::new();
    for l in loaded.lots {
        let org_id = l.org_id;
        let (id, kind) = (l.id, l.kind.clone());
        let lot = store::stored_lot(l).ok_or_else(|| {
            BatchError::Rule(Error::internal(format!("lot {id} has unknown kind {kind}")))
        })?;
        lots_by_org.entry(org_id).or_default().push(lot);
    }
    let mut holds_by_org: HashMap<i64, Vec<Hold>> = HashMap::new();
    for h in loaded.holds {
        let Some(status) = HoldStatus::parse(&h.status) else {
            return Err(BatchError::Rule(Error::internal(format!(
                "hold {} has unknown status",
                h.id
            ))));
        };
        holds_by_org.entry(h.org_id).or_default().push(Hold {
            id: h.id,
            held: h.held_micros,
            status,
            expires_at: h.expires_at,
            meter: h.meter,
            quantity: h.quantity,
            model: h.model,
            created_at: h.created_at,
            is_new: false,
            finished: false,
            transaction_id: h.transaction_id,
            charged: h.charged_micros,
        });
    }
    let mut books: BTreeMap<i64, Book> = BTreeMap::new();
    for o in orgs {
        let mut book = Book::new(
            o.id,
            o.balance_micros,
            o.held_micros,
            o.ledger_seq,
            lots_by_org.remove(&o.id).unwrap_or_default(),
            holds_by_org.remove(&o.id).unwrap_or_default(),
        );
        book.sweep(now, new_id);
        books.insert(o.id, book);
    }
    Ok((books, idem_seen, granted_sources))
}

/// Step 3: apply each operation in order.
fn apply_all(
    books: &mut BTreeMap<i64, Book>,
    mut idem_seen: IdemSeen,
    mut granted_sources: BTreeSet<(String, String)>,
    ops: &[Prepared],
    now: DateTime<Utc>,
) -> Result<(Vec<Result<Outcome>>, Extra), BatchError> {
    let mut extra = Extra::default();
    let mut outcomes = Vec::with_capacity(ops.len());
    for p in ops {
        let Some(book) = books.get_mut(&p.org_id) else {
            outcomes.push(Err(Error::internal(format!(
                "organization {} vanished",
                p.org_id
            ))));
            continue;
        };
        if let Some(idem) = &p.idem
            && let Some((hash, response)) =
                idem_seen.get(&(idem.org_id, idem.method, idem.key.clone()))
        {
            outcomes.push(if *hash == idem.hash {
                replay(&p.op, response)
            } else {
                Err(Error::IdempotencyKeyReused)
            });
            continue;
        }
        // A refused operation leaves no trace in the batch: its book goes
        // back to how it was before the operation.
        let saved = book.checkpoint();
        let result = apply_one(book, p, now, &mut granted_sources, &mut extra);
        match &result {
            Ok(_) => {}
            Err(Error::Internal(detail)) => {
                return Err(BatchError::Rule(Error::Internal(detail.clone())));
            }
            Err(_) => book.restore(saved),
        }
        if let (Ok(outcome), Some(idem)) = (&result, &p.idem) {
            let response = stored_response(outcome).map_err(BatchError::Rule)?;
            idem_seen.insert(
                (idem.org_id, idem.method, idem.key.clone()),
                (idem.hash.clone(), response.clone()),
            );
            match outcome {
                // A `Consume`'s ledger row is its record (see `ConsumeKey`).
                Outcome::Consume(o) => {
                    extra.consume_keys.insert(
                        o.transaction_id.clone(),
                        ConsumeKey {
                            hash: idem.hash.clone(),
                            available_after: o.balance_micros,
                        },
                    );
                }
                Outcome::Reserve(_)
                | Outcome::Adjust(_)
                | Outcome::Grant(_)
                | Outcome::Settle(_)
                | Outcome::Void(_)
                | Outcome::TakeBack(_)
                | Outcome::Commit(_)
                | Outcome::Release(_)
                | Outcome::Swept => extra.idempotency.push((idem.clone(), response)),
            }
        }
        outcomes.push(result);
    }
    Ok((outcomes, extra))
}

/// Step 4: write, new lots first (allocations need their ids), then the
/// rest; a checked write also makes sure each organization row is still
/// as its warm state says (balance, sequence; no holds).
async fn write_batch(
    source: Source<'_>,
    books: &BTreeMap<i64, Book>,
    mut extra: Extra,
    now: DateTime<Utc>,
) -> Result<(), BatchError> {
    let mut new_lots = Vec::new();
    let mut new_lot_refs = Vec::new();
    for book in books.values() {
        for lot in &book.lots {
            if let LotRef::New(n) = lot.id {
                new_lots.push(NewLot {
                    org_id: book.org_id,
                    kind: lot.kind.as_str(),
                    allocated_micros: lot.allocated,
                    remaining_micros: lot.remaining,
                    expires_at: lot.expires_at,
                    source_type: lot.source_type.clone(),
                    source_id: lot.source_id.clone(),
                    created_at: lot.created_at,
                });
                new_lot_refs.push((book.org_id, n));
            }
        }
    }
    let new_lot_ids: HashMap<(i64, usize), i64> = match source {
        _ if new_lots.is_empty() => HashMap::new(),
        Source::Locked(txn) => new_lot_refs
            .into_iter()
            .zip(store::insert_lots(txn, new_lots).await?)
            .collect(),
        Source::Warm(..) => {
            return Err(BatchError::Rule(Error::internal(
                "a warm batch created lots",
            )));
        }
    };
    let side_writes = std::mem::take(&mut extra.side_writes);
    let mut rows = changed_rows(books, extra, now, &new_lot_ids).map_err(BatchError::Rule)?;
    match source {
        Source::Locked(txn) => {
            store::write(txn, rows, now).await?;
            for w in side_writes {
                let touched = txn.execute_raw(w.statement).await?.rows_affected();
                if w.expect_rows.is_some_and(|n| n != touched) {
                    return Err(BatchError::Rule(Error::Unavailable(
                        "a concurrent change to the same record; retry".into(),
                    )));
                }
            }
        }
        Source::Warm(db, warm) => {
            if !side_writes.is_empty() {
                return Err(BatchError::Rule(Error::internal(
                    "a warm batch carried side writes",
                )));
            }
            for org in &mut rows.orgs {
                let Some(w) = warm.get(&org.id) else {
                    return Err(BatchError::Rule(Error::internal(format!(
                        "no expected state for organization {}",
                        org.id
                    ))));
                };
                org.expected = Some(store::Expected {
                    balance_micros: w.balance,
                    held_micros: 0,
                    ledger_seq: w.seq,
                });
            }
            // The statement commits by itself: if its connection fails
            // while it runs, it may or may not have committed.
            store::write(db, rows, now).await.map_err(|e| {
                if crate::db::is_connection_error(&e) {
                    BatchError::Unknown(e)
                } else {
                    BatchError::Db(e)
                }
            })?;
        }
    }
    Ok(())
}

/// Every change the books and `extra` hold, as rows (new lots already
/// inserted, with the ids in `new_lot_ids`).
fn changed_rows(
    books: &BTreeMap<i64, Book>,
    extra: Extra,
    now: DateTime<Utc>,
    new_lot_ids: &HashMap<(i64, usize), i64>,
) -> Result<Rows> {
    let mut rows = Rows::default();
    let mut monthly: BTreeMap<(i64, String, &'static str), (i64, i64)> = BTreeMap::new();
    for book in books.values() {
        for lot in &book.lots {
            if let LotRef::Stored(id) = lot.id {
                if lot.dirty {
                    rows.lot_updates.push(LotUpdate {
                        id,
                        remaining_micros: lot.remaining,
                    });
                }
                if lot.settled {
                    rows.settled_lots.push(SettledLot {
                        id,
                        kind: lot.kind.as_str(),
                        expires_at: lot.expires_at,
                    });
                }
            }
        }
        for e in &book.entries {
            let key = extra.consume_keys.get(&e.id);
            rows.entries.push(ledger_transaction::Model {
                id: e.id.clone(),
                org_id: book.org_id,
                seq: e.seq,
                kind: e.kind.into(),
                amount_micros: e.amount,
                balance_after_micros: e.balance_after,
                description: e.details.description.clone(),
                reference_type: e.details.reference_type.clone(),
                reference_id: e.details.reference_id.clone(),
                meter: e.details.meter.clone(),
                quantity: e.details.quantity,
                model: e.details.model.clone(),
                created_at: e.created_at,
                idempotency_hash: key.map(|k| k.hash.clone()),
                available_after_micros: key.map(|k| k.available_after),
            });
            for (lot, amount) in &e.allocations {
                let lot_id = match lot {
                    LotRef::Stored(id) => *id,
                    LotRef::New(n) => {
                        new_lot_ids
                            .get(&(book.org_id, *n))
                            .copied()
                            .ok_or_else(|| {
                                Error::internal(format!(
                                    "allocation to lot {n} that was not inserted"
                                ))
                            })?
                    }
                };
                rows.allocations.push(Allocation {
                    transaction_id: e.id.clone(),
                    lot_id,
                    amount_micros: *amount,
                });
            }
            let sums = monthly
                .entry((book.org_id, month_key(e.created_at), monthly_bucket(e)))
                .or_insert((0, 0));
            if e.amount >= 0 {
                sums.0 = sums.0.saturating_add(e.amount);
            } else {
                sums.1 = sums.1.saturating_add(-e.amount);
            }
        }
        for h in &book.holds {
            if h.is_new {
                rows.new_holds.push(reservation::Model {
                    id: h.id.clone(),
                    org_id: book.org_id,
                    held_micros: h.held,
                    status: h.status.as_str().into(),
                    meter: h.meter.clone(),
                    quantity: h.quantity,
                    model: h.model.clone(),
                    transaction_id: h.transaction_id.clone(),
                    expires_at: h.expires_at,
                    created_at: h.created_at,
                    finished_at: h.finished.then_some(now),
                    charged_micros: h.charged,
                });
            } else if h.finished {
                rows.finished_holds.push(FinishedHold {
                    id: h.id.clone(),
                    status: h.status.as_str(),
                    transaction_id: h.transaction_id.clone(),
                    charged_micros: h.charged,
                });
            }
        }
        // Every write of an organization's rows also writes the
        // organization row: the PostgreSQL store relies on it to notice a
        // commit that raced its lock (see `store::postgres`).
        let writes = book.touched
            || book.lots.iter().any(|l| l.dirty)
            || book.holds.iter().any(|h| h.is_new || h.finished)
            || extra
                .idempotency
                .iter()
                .any(|(k, _)| k.org_id == book.org_id);
        if writes {
            rows.orgs.push(OrgRow {
                id: book.org_id,
                balance_micros: book.balance,
                held_micros: book.held,
                ledger_seq: book.seq,
                expected: None,
            });
        }
    }
    rows.monthly = monthly
        .into_iter()
        .map(|((org_id, month, kind), (credit, debit))| MonthlyRow {
            org_id,
            month,
            kind,
            credit_micros: credit,
            debit_micros: debit,
        })
        .collect();
    rows.idempotency = extra
        .idempotency
        .into_iter()
        .map(|(k, response)| IdemRow {
            org_id: k.org_id,
            method: k.method.into(),
            key: k.key,
            request_hash: k.hash,
            response,
        })
        .collect();
    rows.audits = extra.audits;
    Ok(rows)
}
