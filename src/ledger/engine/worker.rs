//! A writer queue's consumer: gathers operations into batches, prepares
//! them outside the transaction, runs the transaction with its retries and
//! answers every caller.

use std::{
    collections::{BTreeSet, HashMap},
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use sea_orm::{ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QuerySelect};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Job, Ledger, MAX_BATCH,
    batch::{BatchError, Source, Warm, apply_batch},
    idempotency::{IdemKey, request_hash},
    ops::{self, Op, Outcome, Prepared},
};
use crate::{
    entities::reservation,
    error::{Error, Result},
    ledger::{HoldAmount, Rates, store},
};

/// What a caller is told when its write's COMMIT failed midway.
const OUTCOME_UNKNOWN: &str = "the write's outcome is unknown (the database connection failed during COMMIT); retry with the same idempotency key";
/// Attempts of a batch on transient failures.
const ATTEMPTS: u32 = 6;

/// A failure worth running the batch again for: a conflict with another
/// transaction, a busy database, or a lost connection (the transaction
/// was rolled back with it; the pool reconnects).
fn is_transient(err: &DbErr) -> bool {
    if crate::db::is_connection_error(err) {
        return true;
    }
    // 40001 serialization_failure, 40P01 deadlock_detected.
    if crate::db::sqlstate(err).is_some_and(|c| c == "40001" || c == "40P01") {
        return true;
    }
    let text = err.to_string().to_ascii_lowercase();
    [
        "could not serialize",
        "deadlock",
        "database is locked",
        "database table is locked",
        "busy",
    ]
    .iter()
    .any(|needle| text.contains(needle))
        || matches!(
            err.sql_err(),
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
        )
}

/// A span for one step of a batch's database work.
fn db_span(step: &'static str) -> tracing::Span {
    tracing::info_span!("db", otel.name = step, db.system = tracing::field::Empty)
}

/// One batch's size and database time, by path and result (Prometheus).
fn record_batch(path: &'static str, operations: usize, started: Instant, result: &'static str) {
    metrics::histogram!(crate::metrics::BATCH_OPERATIONS, "path" => path).record(operations as f64);
    metrics::histogram!(crate::metrics::BATCH_DURATION, "path" => path, "result" => result)
        .record(started.elapsed().as_secs_f64());
}

/// Part of a batch: operations with their slots in it.
type Part = Vec<(usize, Prepared)>;

/// Whether `op` may be written from a [`Warm`] state: `Consume` only.
fn may_run_warm(op: &Op) -> bool {
    match op {
        Op::Consume(_) => true,
        Op::Reserve(_)
        | Op::Commit(_)
        | Op::Release(_)
        | Op::Adjust(_)
        | Op::Grant(_)
        | Op::Settle(_)
        | Op::Void(_)
        | Op::TakeBack(_)
        | Op::Sweep(_) => false,
    }
}

/// A batch worker: the [`Ledger`]'s state plus its own connection pool, on
/// a thread of its own (see [`Ledger::start`]).
pub(super) struct Worker {
    pub(super) ledger: Ledger,
    pub(super) db: DatabaseConnection,
    pub(super) queue: mpsc::Receiver<Job>,
    /// What this worker's last committed batches left, per organization
    /// (PostgreSQL): see [`Warm`].
    pub(super) warm: std::sync::Mutex<HashMap<i64, Warm>>,
}

/// Organizations whose warm state a worker keeps at most (a bound on
/// memory: past it, it starts over).
const MAX_WARM: usize = 100_000;

impl std::ops::Deref for Worker {
    type Target = Ledger;

    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

impl Worker {
    /// Row ids of `external_ids` (created on first use), through this
    /// worker's pool.
    async fn ensure_orgs(&self, external_ids: &BTreeSet<String>) -> Result<HashMap<String, i64>> {
        self.ledger.ensure_orgs_on(&self.db, external_ids).await
    }

    pub(super) async fn work(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => None,
                job = self.queue.recv() => job,
            };
            let Some(first) = first else { break };
            let mut batch = first.ops;
            // The batch's span: a child of the first caller's, linked from
            // every other caller's that rides it.
            let span = tracing::info_span!(
                parent: &first.span,
                "ledger.batch",
                operations = tracing::field::Empty,
            );
            while batch.len() < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(job) => {
                        span.follows_from(&job.span);
                        batch.extend(job.ops);
                    }
                    Err(_) => break,
                }
            }
            span.record("operations", batch.len());
            // A caller that has gone (its deadline passed, it hung up) was
            // told nothing was confirmed; its operation is not run.
            batch.retain(|(_, reply)| !reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            // A panic is a bug, but it must not silently stop the writer:
            // its batch's transaction is rolled back (dropped), its callers
            // are answered UNAVAILABLE (their replies are dropped), and the
            // worker goes on with the next batch.
            let run = std::panic::AssertUnwindSafe(tracing::Instrument::instrument(
                self.run_batch(batch),
                span,
            ));
            if futures::FutureExt::catch_unwind(run).await.is_err() {
                tracing::error!("ledger writer panicked in a batch; its callers get UNAVAILABLE");
            }
        }
    }

    /// Runs `jobs` and answers each of them.
    async fn run_batch(&self, jobs: Vec<(Op, oneshot::Sender<Result<Outcome>>)>) {
        let (ops, replies): (Vec<Op>, Vec<_>) = jobs.into_iter().unzip();
        let results = self.execute(ops).await;
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }

    /// Executes `ops` and returns one result per op, in order.
    ///
    /// The organizations that can be written warm (see [`Warm`]) go in a
    /// batch of their own, run beside the batch of the rest: an
    /// organization whose holds need the lock does not make the others'
    /// `Consume`s wait for it. Each organization's operations stay in one
    /// batch, in arrival order.
    async fn execute(&self, ops: Vec<Op>) -> Vec<Result<Outcome>> {
        let count = ops.len();
        let mut results: Vec<Option<Result<Outcome>>> = (0..count).map(|_| None).collect();
        let mut ready = Vec::with_capacity(count);
        for (slot, op) in self.prepare(ops).await.into_iter().enumerate() {
            match op {
                Ok(p) => ready.push((slot, p)),
                Err(e) => results[slot] = Some(Err(e)),
            }
        }
        let (warm, states, rest) = self.split_warm(ready);
        let (warm, rest) = futures::join!(
            self.run_batch_part(warm, Some(&states)),
            self.run_batch_part(rest, None)
        );
        for (slot, outcome) in warm.into_iter().chain(rest) {
            results[slot] = Some(outcome);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("operation lost in batch"))))
            .collect()
    }

    /// One transaction over `part` (or one each, locked, after a failure),
    /// starting from `warm` when given, with the result of each operation
    /// by its slot in the batch.
    async fn run_batch_part(
        &self,
        part: Part,
        warm: Option<&HashMap<i64, Warm>>,
    ) -> Vec<(usize, Result<Outcome>)> {
        if part.is_empty() {
            return Vec::new();
        }
        let (slots, prepared): (Vec<usize>, Vec<Prepared>) = part.into_iter().unzip();
        let outcomes = match self.transact(&prepared, warm).await {
            Ok(outcomes) => outcomes,
            // Only a broken rule (one operation's data) is worth
            // isolating; a database that is down fails every operation
            // alike, and an unknown outcome must never be run again.
            Err(e @ Error::Internal(_)) if prepared.len() > 1 => {
                tracing::warn!(error = %e, ops = prepared.len(), "batch failed; running its operations one by one");
                let mut each = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    let single = self.transact(std::slice::from_ref(p), None).await;
                    each.push(single.and_then(|mut v| {
                        v.pop().unwrap_or_else(|| Err(Error::internal("empty")))
                    }));
                }
                each
            }
            // The same answer for every operation of the batch.
            Err(e) => prepared.iter().map(|_| Err(e.clone())).collect(),
        };
        for (p, outcome) in prepared.iter().zip(&outcomes) {
            if let Ok(outcome) = outcome {
                ops::observe(&p.op, outcome);
            }
        }
        slots.into_iter().zip(outcomes).collect()
    }

    /// Splits a batch by organization: those that may be written from the
    /// writer's [`Warm`] states (PostgreSQL; every operation a `Consume`,
    /// the organization's state known), with those states, and the rest
    /// (everything, on SQLite).
    fn split_warm(&self, ready: Part) -> (Part, HashMap<i64, Warm>, Part) {
        let mut states = HashMap::new();
        if self.inner.write_lock.is_some() {
            return (Vec::new(), states, ready);
        }
        let Ok(warm) = self.warm.lock() else {
            return (Vec::new(), states, ready);
        };
        let cold: std::collections::HashSet<i64> = ready
            .iter()
            .filter(|(_, p)| !may_run_warm(&p.op) || !warm.contains_key(&p.org_id))
            .map(|(_, p)| p.org_id)
            .collect();
        for (_, p) in &ready {
            if !cold.contains(&p.org_id)
                && !states.contains_key(&p.org_id)
                && let Some(state) = warm.get(&p.org_id)
            {
                states.insert(p.org_id, state.clone());
            }
        }
        drop(warm);
        let (hot, rest) = ready
            .into_iter()
            .partition(|(_, p)| states.contains_key(&p.org_id));
        (hot, states, rest)
    }

    /// Resolves organizations, costs and idempotency fingerprints.
    async fn prepare(&self, ops: Vec<Op>) -> Vec<Result<Prepared>> {
        let mut externals = BTreeSet::new();
        for op in &ops {
            if let Some(org) = op.named_org() {
                externals.insert(org.to_owned());
            }
        }
        let orgs = match self.ensure_orgs(&externals).await {
            Ok(orgs) => orgs,
            Err(e) => {
                let message = e.to_string();
                return ops
                    .into_iter()
                    .map(|_| Err(Error::Unavailable(message.clone())))
                    .collect();
            }
        };
        let holds = self.hold_orgs(&ops).await;
        let rates = self.rates();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(self.prepare_one(op, &orgs, &holds, &rates).await);
        }
        out
    }

    /// The organization of every hold that `ops` commit or release, by
    /// hold id, in one query.
    async fn hold_orgs(&self, ops: &[Op]) -> Result<HashMap<String, i64>> {
        let ids: Vec<&str> = ops.iter().filter_map(Op::named_hold).collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, i64)> = reservation::Entity::find()
            .select_only()
            .column(reservation::Column::Id)
            .column(reservation::Column::OrgId)
            .filter(reservation::Column::Id.is_in(ids))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn prepare_one(
        &self,
        op: Op,
        orgs: &HashMap<String, i64>,
        holds: &Result<HashMap<String, i64>>,
        rates: &Rates,
    ) -> Result<Prepared> {
        let org = |ext: &str| {
            orgs.get(ext)
                .copied()
                .ok_or_else(|| Error::internal(format!("organization {ext} was not created")))
        };
        match op {
            Op::Consume(ref i) => {
                let org_id = org(&i.org)?;
                let cost = rates.cost(i.meter, i.model.as_deref(), i.quantity)?;
                let hash = request_hash(&[
                    i.meter.as_str(),
                    &i.quantity.to_string(),
                    i.model.as_deref().unwrap_or(""),
                    i.description.as_deref().unwrap_or(""),
                ]);
                let idem = IdemKey {
                    org_id,
                    method: store::CONSUME_METHOD,
                    key: i.key.clone(),
                    hash,
                };
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem: Some(idem),
                })
            }
            Op::Reserve(ref i) => {
                let org_id = org(&i.org)?;
                let (cost, fingerprint) = match &i.amount {
                    HoldAmount::Micros(m) => (*m, format!("amount:{m}")),
                    HoldAmount::Usage {
                        meter,
                        quantity,
                        model,
                    } => (
                        rates.cost(*meter, model.as_deref(), *quantity)?,
                        format!(
                            "usage:{}:{quantity}:{}",
                            meter.as_str(),
                            model.as_deref().unwrap_or("")
                        ),
                    ),
                };
                let hash = request_hash(&[&fingerprint, &i.ttl_seconds.to_string()]);
                let idem = IdemKey {
                    org_id,
                    method: "reserve",
                    key: i.key.clone(),
                    hash,
                };
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem: Some(idem),
                })
            }
            Op::Commit(ref i) => {
                let org_id = self
                    .hold_org(holds, &i.reservation_id, i.org.as_deref())
                    .await?;
                let cost = rates.cost(i.meter, i.model.as_deref(), i.quantity)?;
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem: None,
                })
            }
            Op::Release(ref i) => {
                let org_id = self
                    .hold_org(holds, &i.reservation_id, i.org.as_deref())
                    .await?;
                Ok(Prepared {
                    org_id,
                    op,
                    cost: 0,
                    idem: None,
                })
            }
            Op::Adjust(ref i) => {
                let org_id = org(&i.org)?;
                let cost = i.amount;
                let idem = i.key.as_ref().map(|key| IdemKey {
                    org_id,
                    method: "manual_adjust",
                    key: key.clone(),
                    hash: request_hash(&[
                        &i.amount.to_string(),
                        &i.reason,
                        &i.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    ]),
                });
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem,
                })
            }
            Op::Grant(ref i) => {
                let org_id = org(&i.org)?;
                // A source grants once whatever the later deliveries say
                // (two events about one invoice may read the plan or the
                // period at different moments): the first grant stands and
                // the fingerprint is the source alone.
                let idem = i.source_id.as_ref().map(|source_id| IdemKey {
                    org_id,
                    method: "grant",
                    key: format!("{}:{source_id}", i.source_type),
                    hash: request_hash(&[&i.source_type, source_id]),
                });
                let cost = i.amount;
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem,
                })
            }
            // Settling and voiding are idempotent on the source whatever
            // the amount, so the fingerprint is the source alone.
            Op::Settle(ref i) => {
                let org_id = org(&i.org)?;
                let idem = IdemKey {
                    org_id,
                    method: "settle",
                    key: format!("{}:{}", i.source_type, i.source_id),
                    hash: request_hash(&[i.entry_kind, i.lot_kind.as_str()]),
                };
                Ok(Prepared {
                    org_id,
                    op,
                    cost: 0,
                    idem: Some(idem),
                })
            }
            Op::Void(ref i) => {
                let org_id = org(&i.org)?;
                let idem = IdemKey {
                    org_id,
                    method: "void",
                    key: format!("{}:{}", i.source_type, i.source_id),
                    hash: request_hash(&[]),
                };
                Ok(Prepared {
                    org_id,
                    op,
                    cost: 0,
                    idem: Some(idem),
                })
            }
            Op::TakeBack(ref i) => {
                let org_id = org(&i.org)?;
                let idem = IdemKey {
                    org_id,
                    method: "take_back",
                    key: i.key.clone(),
                    hash: request_hash(&[&i.source_type, &i.source_id, &i.amount.to_string()]),
                };
                Ok(Prepared {
                    org_id,
                    op,
                    cost: 0,
                    idem: Some(idem),
                })
            }
            Op::Sweep(org_id) => Ok(Prepared {
                org_id,
                op,
                cost: 0,
                idem: None,
            }),
        }
    }

    /// The organization of reservation `id`, from the batch's `holds`
    /// (checked against `org`).
    async fn hold_org(
        &self,
        holds: &Result<HashMap<String, i64>>,
        id: &str,
        org: Option<&str>,
    ) -> Result<i64> {
        let org_id = *holds
            .as_ref()
            .map_err(Clone::clone)?
            .get(id)
            .ok_or(Error::ReservationNotFound)?;
        if let Some(ext) = org
            && self.org_id_on(&self.db, ext).await? != Some(org_id)
        {
            return Err(Error::ReservationNotFound);
        }
        Ok(org_id)
    }

    /// The batch committed (or may have): this process's cached balances
    /// of its organizations are dropped before anyone is answered, and the
    /// other replicas are told.
    fn written(&self, ops: &[Prepared]) {
        self.forget_balances(ops);
        self.ledger.announce(ops.iter().map(|p| p.org_id));
    }

    fn forget_balances(&self, ops: &[Prepared]) {
        if let Ok(mut cache) = self.balance_cache().lock() {
            for p in ops {
                cache.invalidate(p.org_id);
            }
        }
    }

    /// One transaction over `ops`, retried on transient failures.
    ///
    /// Given the [`Warm`] states of its organizations (from
    /// [`Self::split_warm`]), the batch first runs without loading: one
    /// autocommitted write, checked against the organization rows. If
    /// that write fails without writing (someone else wrote, a key was
    /// stored already, an operation was refused) the batch runs again on
    /// the locking path, which always progresses.
    async fn transact(
        &self,
        ops: &[Prepared],
        warm: Option<&HashMap<i64, Warm>>,
    ) -> Result<Vec<Result<Outcome>>> {
        if let Some(warm) = warm {
            let now = self.now();
            let started = Instant::now();
            let result = tracing::Instrument::instrument(
                apply_batch(Source::Warm(&self.db, warm), ops, now),
                db_span("warm write"),
            )
            .await;
            let label = match &result {
                Ok(_) => "ok",
                Err(BatchError::Rule(_)) => "refused",
                Err(BatchError::Unknown(_)) => "unknown",
                // Not written: the batch goes on to the locking path.
                Err(BatchError::Db(_)) => "fallback",
            };
            record_batch("warm", ops.len(), started, label);
            match result {
                Ok(applied) => {
                    self.keep_warm(applied.warm);
                    self.written(ops);
                    self.inner.counts.warm.fetch_add(1, Relaxed);
                    return Ok(applied.outcomes);
                }
                Err(BatchError::Unknown(e)) => {
                    self.forget_warm(ops);
                    return Err(self.outcome_unknown(ops, &e));
                }
                Err(BatchError::Rule(e)) => {
                    self.forget_warm(ops);
                    self.forget_balances(ops);
                    return Err(e);
                }
                Err(BatchError::Db(e)) => {
                    tracing::debug!(error = %e, "warm batch not written; running it locked");
                    self.forget_warm(ops);
                    self.inner.counts.warm_fallbacks.fetch_add(1, Relaxed);
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let _guard = match &self.inner.write_lock {
                Some(lock) => Some(lock.lock().await),
                None => None,
            };
            let now = self.now();
            let started = Instant::now();
            let begin = crate::db::begin_write(&self.db);
            let result = match tracing::Instrument::instrument(begin, db_span("BEGIN")).await {
                Err(e) => Err(e),
                Ok(txn) => match tracing::Instrument::instrument(
                    apply_batch(Source::Locked(&txn), ops, now),
                    db_span("lock, load and write"),
                )
                .await
                {
                    Ok(applied) => {
                        match tracing::Instrument::instrument(txn.commit(), db_span("COMMIT")).await
                        {
                            Ok(()) => Ok(applied),
                            Err(e) => {
                                record_batch("locked", ops.len(), started, "unknown");
                                self.forget_warm(ops);
                                return Err(self.outcome_unknown(ops, &e));
                            }
                        }
                    }
                    Err(BatchError::Db(e) | BatchError::Unknown(e)) => {
                        let _ = txn.rollback().await;
                        Err(e)
                    }
                    Err(BatchError::Rule(e)) => {
                        let _ = txn.rollback().await;
                        record_batch("locked", ops.len(), started, "refused");
                        self.forget_warm(ops);
                        self.forget_balances(ops);
                        return Err(e);
                    }
                },
            };
            // After the transaction, whatever its outcome: a balance read
            // while it ran is never kept.
            self.forget_balances(ops);
            let label = if result.is_ok() { "ok" } else { "error" };
            record_batch("locked", ops.len(), started, label);
            match result {
                Ok(applied) => {
                    self.keep_warm(applied.warm);
                    self.ledger.announce(ops.iter().map(|p| p.org_id));
                    self.inner.counts.locked.fetch_add(1, Relaxed);
                    return Ok(applied.outcomes);
                }
                Err(e) if attempt < ATTEMPTS && is_transient(&e) => {
                    drop(_guard);
                    tracing::debug!(error = %e, attempt, "retrying ledger batch");
                    tokio::time::sleep(Duration::from_millis(2u64 << attempt)).await;
                }
                // A lost connection becomes UNAVAILABLE here (`From<DbErr>`).
                Err(e) => {
                    self.forget_warm(ops);
                    return Err(e.into());
                }
            }
        }
    }

    /// The write may or may not have reached the database: running the
    /// batch again could apply it twice. Only the callers can resolve it,
    /// by retrying with their idempotency keys.
    fn outcome_unknown(&self, ops: &[Prepared], e: &DbErr) -> Error {
        self.written(ops);
        tracing::warn!(error = %e, ops = ops.len(), "ledger write failed midway; outcome unknown");
        Error::Unavailable(OUTCOME_UNKNOWN.into())
    }

    /// Remembers what a committed batch left (or forgets it, where a later
    /// batch must load).
    fn keep_warm(&self, states: Vec<(i64, Option<Warm>)>) {
        if self.inner.write_lock.is_some() {
            return;
        }
        if let Ok(mut warm) = self.warm.lock() {
            if warm.len() > MAX_WARM {
                warm.clear();
            }
            for (org, state) in states {
                match state {
                    Some(s) => warm.insert(org, s),
                    None => warm.remove(&org),
                };
            }
        }
    }

    fn forget_warm(&self, ops: &[Prepared]) {
        if let Ok(mut warm) = self.warm.lock() {
            for p in ops {
                warm.remove(&p.org_id);
            }
        }
    }
}
