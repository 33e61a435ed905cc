//! Every ledger write, batched: one database transaction per batch.
//!
//! Callers hand an operation to [`Ledger`]; it goes to the queue of one
//! worker, chosen by a hash of the organization (PostgreSQL has two
//! workers, so concurrent batches touch disjoint rows; SQLite has one). The
//! workers run on a thread of their own with their own runtime and
//! connection pool, so their round trips never wait behind request
//! handling. A worker takes whatever has queued up (up to [`MAX_BATCH`])
//! and runs it as one transaction:
//!
//! 1. lock the organizations' rows in id order (`SELECT … FOR UPDATE` on
//!    PostgreSQL; on SQLite this process's single writer lock), so replicas
//!    never interleave on one organization and never deadlock each other;
//! 2. load each organization's live lots, the holds the batch names or that
//!    have expired, and the idempotency records of the batch's keys;
//! 3. sweep expiries, then apply each operation through [`super::model`], in
//!    arrival order: a refused operation (insufficient credits, key reused)
//!    changes nothing and does not affect the others;
//! 4. write every change and commit.
//!
//! Steps 1, 2 and 4 are `store`'s: on PostgreSQL one statement
//! locks and loads and one statement writes, so a batch is four round trips
//! whatever its size.
//!
//! Answers are released only after the commit. A transient failure
//! (serialization, deadlock, busy, lost connection) retries the whole batch;
//! any other failure of a multi-operation batch re-runs its operations one
//! by one so one bad operation cannot fail its neighbours.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Datelike, TimeDelta, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, QueryFilter, TransactionTrait, sea_query::OnConflict,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    AdjustInput, AdjustOutcome, CommitInput, CommitOutcome, ConsumeInput, ConsumeOutcome,
    GrantInput, GrantOutcome, HoldAmount, Rates, ReleaseInput, ReleaseOutcome, ReserveInput,
    ReserveOutcome,
    balance::BalanceCache,
    model::{Book, EntryDetails, Hold, HoldStatus, Lot, LotKind, LotRef},
    store::{
        self, Allocation, FinishedHold, IdemRow, KeyRef, LotUpdate, MonthlyRow, NewLot, OrgRow,
        Rows, SourceRef, Wanted,
    },
};
use crate::{
    clock::SharedClock,
    entities::{admin_audit, ledger_transaction, organization, reservation},
    error::{Error, Result},
};

/// What a caller is told when its write's COMMIT failed midway.
const OUTCOME_UNKNOWN: &str = "the write's outcome is unknown (the database connection failed during COMMIT); retry with the same idempotency key";

/// Most operations one transaction carries.
pub const MAX_BATCH: usize = 256;
/// Attempts of a batch on transient failures.
const ATTEMPTS: u32 = 6;

/// One ledger write, as the writer queue carries it.
#[derive(Debug, Clone)]
pub enum Op {
    Consume(ConsumeInput),
    Reserve(ReserveInput),
    Commit(CommitInput),
    Release(ReleaseInput),
    Adjust(AdjustInput),
    Grant(GrantInput),
    /// Only the sweep that every transaction does on load, for one
    /// organization (by row id).
    Sweep(i64),
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
    Swept,
}

/// The inner value of an [`Outcome`] of the expected variant (an
/// operation always answers with its own variant).
macro_rules! expect {
    ($outcome:expr, $variant:path) => {
        match $outcome {
            $variant(o) => Ok(o),
            other => Err(Error::internal(format!("unexpected outcome {other:?}"))),
        }
    };
}

/// Operations that go into one batch together, each with its reply.
struct Job {
    ops: Vec<(Op, oneshot::Sender<Result<Outcome>>)>,
}

/// How many operations may wait in one writer queue. Past it, callers are
/// refused at once (RESOURCE_EXHAUSTED) rather than left waiting without
/// bound behind a writer that cannot keep up.
const QUEUE_DEPTH: usize = 4096;

/// An operation made ready for the transaction: its organization's row id,
/// its cost and its idempotency key resolved outside the transaction.
struct Prepared {
    org_id: i64,
    op: Op,
    cost: i64,
    idem: Option<IdemKey>,
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdemKey {
    org_id: i64,
    method: &'static str,
    key: String,
    hash: String,
}

struct Inner {
    db: DatabaseConnection,
    clock: SharedClock,
    rates: RwLock<Arc<Rates>>,
    orgs: RwLock<HashMap<String, i64>>,
    /// Balances read recently (see [`super::balance`] for what keeps them
    /// exact, on SQLite and across PostgreSQL replicas).
    pub(crate) balances: Arc<std::sync::Mutex<BalanceCache>>,
    /// SQLite has one writer: every write transaction of this process holds
    /// this lock, so none ever meets "database is locked".
    write_lock: Option<Mutex<()>>,
    /// PostgreSQL: the organizations written, for the other replicas'
    /// balance caches (see [`super::balance::announce`]).
    written: Option<mpsc::UnboundedSender<Vec<i64>>>,
}

/// The ledger's write side and its caches. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
    /// One queue per worker; an organization's operations go to one queue.
    senders: Arc<Vec<mpsc::Sender<Job>>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The fingerprint a replay must match: sha256 over each part preceded by
/// its length, so no two different lists of parts encode alike (a part
/// may contain any byte, NUL included), hex.
fn request_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A failure worth running the batch again for: a conflict with another
/// transaction, a busy database, or a lost connection (the transaction
/// was rolled back with it; the pool reconnects).
fn is_transient(err: &DbErr) -> bool {
    if crate::db::is_connection_error(err) {
        return true;
    }
    let text = err.to_string().to_ascii_lowercase();
    [
        "could not serialize",
        "deadlock",
        "database is locked",
        "database table is locked",
        "busy",
        "40001",
        "40p01",
    ]
    .iter()
    .any(|needle| text.contains(needle))
        || matches!(
            err.sql_err(),
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
        )
}

impl Ledger {
    /// Starts the batch workers: reads go through `db`, writes through a
    /// pool of their own on `database_url`. They stop when `shutdown` is
    /// cancelled, after finishing the batch in hand.
    pub async fn start(
        db: DatabaseConnection,
        database_url: &str,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let database_url = database_url.to_owned();
        let database_url_for_listener = database_url.clone();
        let rates = Rates::load(&db).await?;
        let sqlite = db.get_database_backend() == DbBackend::Sqlite;
        // SQLite writes one transaction at a time. On PostgreSQL each worker
        // owns a share of the organizations (by hash), so concurrent batches
        // touch disjoint rows and never wait on each other's locks. Two
        // workers keep one batch in the database while the next is being
        // gathered; more only shrink batches (measured: 8 workers gave
        // 2.3k Consume/s, 2 gave 2.8–3.1k/s, see the README).
        let workers = if sqlite { 1 } else { 2 };
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::channel(QUEUE_DEPTH)).unzip();
        let (written, announcements) = if sqlite {
            (None, None)
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        };
        let ledger = Self {
            inner: Arc::new(Inner {
                db,
                clock,
                rates: RwLock::new(Arc::new(rates)),
                orgs: RwLock::new(HashMap::new()),
                write_lock: sqlite.then(|| Mutex::new(())),
                written,
                balances: Arc::new(std::sync::Mutex::new(if sqlite {
                    BalanceCache::single_writer()
                } else {
                    BalanceCache::shared()
                })),
            }),
            senders: Arc::new(senders),
        };
        // The workers run on a thread of their own, with their own runtime
        // and connections, so their database round trips never wait behind
        // request handling on the server's runtime.
        let (ready, started) = oneshot::channel();
        let (worker_ledger, worker_stop) = (ledger.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(Error::internal(format!("ledger runtime: {e}"))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let db =
                        match crate::db::connect_writer(&database_url, workers as u32 + 1).await {
                            Ok(db) => db,
                            Err(e) => {
                                let _ = ready.send(Err(e.into()));
                                return;
                            }
                        };
                    let _ = ready.send(Ok(()));
                    let mut tasks = Vec::new();
                    for queue in receivers {
                        let worker = Worker {
                            ledger: worker_ledger.clone(),
                            db: db.clone(),
                            queue,
                        };
                        tasks.push(tokio::spawn(worker.work(worker_stop.clone())));
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                    let _ = db.close().await;
                });
            })
            .map_err(|e| Error::internal(format!("cannot start the ledger thread: {e}")))?;
        started
            .await
            .map_err(|_| Error::internal("the ledger thread died while starting"))??;
        if let Some(announcements) = announcements {
            tokio::spawn(super::balance::announce(
                ledger.inner.db.clone(),
                announcements,
                shutdown.clone(),
            ));
            tokio::spawn(super::balance::listen(
                database_url_for_listener,
                ledger.inner.balances.clone(),
                shutdown.clone(),
            ));
        }
        let reloader = ledger.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
                if let Err(e) = reloader.reload_rates().await {
                    tracing::warn!(error = %e, "could not reload rates");
                }
            }
        });
        Ok(ledger)
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Tells the other replicas that `orgs` were written (PostgreSQL).
    fn announce(&self, orgs: impl Iterator<Item = i64>) {
        if let Some(written) = &self.inner.written {
            let _ = written.send(orgs.collect());
        }
    }

    pub(crate) fn balance_cache(&self) -> &std::sync::Mutex<BalanceCache> {
        &self.inner.balances
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    pub fn rates(&self) -> Arc<Rates> {
        self.inner
            .rates
            .read()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub async fn reload_rates(&self) -> Result<()> {
        let rates = Arc::new(Rates::load(&self.inner.db).await?);
        if let Ok(mut slot) = self.inner.rates.write() {
            *slot = rates;
        }
        Ok(())
    }

    async fn submit(&self, op: Op) -> Result<Outcome> {
        self.submit_together(vec![op])
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::internal("no answer for the operation")))
    }

    /// Runs `ops` in one batch (one transaction), in order, as if they had
    /// arrived together: each answered as on its own. For tests of batch
    /// behaviour and for callers whose writes belong together.
    pub async fn submit_together(&self, ops: Vec<Op>) -> Result<Vec<Result<Outcome>>> {
        let mut out = Vec::with_capacity(ops.len());
        for answer in self.enqueue(ops)? {
            out.push(
                answer.await.map_err(|_| {
                    Error::Unavailable("the ledger stopped before answering".into())
                })?,
            );
        }
        Ok(out)
    }

    /// Puts `ops` on the queue of the first one's organization, as one job.
    fn enqueue(&self, ops: Vec<Op>) -> Result<Vec<oneshot::Receiver<Result<Outcome>>>> {
        let Some(first) = ops.first() else {
            return Ok(Vec::new());
        };
        let queue = &self.senders[self.queue_of(first)];
        let (ops, answers): (Vec<_>, Vec<_>) = ops
            .into_iter()
            .map(|op| {
                let (reply, answer) = oneshot::channel();
                ((op, reply), answer)
            })
            .unzip();
        queue.try_send(Job { ops }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                Error::Unavailable("the ledger is shutting down".into())
            }
        })?;
        Ok(answers)
    }

    /// The writer queue of `op`'s organization.
    fn queue_of(&self, op: &Op) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match op {
            Op::Consume(i) => i.org.hash(&mut hasher),
            Op::Reserve(i) => i.org.hash(&mut hasher),
            Op::Adjust(i) => i.org.hash(&mut hasher),
            Op::Grant(i) => i.org.hash(&mut hasher),
            Op::Commit(i) => i.reservation_id.hash(&mut hasher),
            Op::Release(i) => i.reservation_id.hash(&mut hasher),
            Op::Sweep(org_id) => org_id.hash(&mut hasher),
        }
        (hasher.finish() % self.senders.len() as u64) as usize
    }

    pub async fn consume(&self, input: ConsumeInput) -> Result<ConsumeOutcome> {
        let outcome = self.submit(Op::Consume(input)).await?;
        expect!(outcome, Outcome::Consume)
    }

    pub async fn reserve(&self, input: ReserveInput) -> Result<ReserveOutcome> {
        let outcome = self.submit(Op::Reserve(input)).await?;
        expect!(outcome, Outcome::Reserve)
    }

    pub async fn commit(&self, input: CommitInput) -> Result<CommitOutcome> {
        let outcome = self.submit(Op::Commit(input)).await?;
        expect!(outcome, Outcome::Commit)
    }

    pub async fn release(&self, input: ReleaseInput) -> Result<ReleaseOutcome> {
        let outcome = self.submit(Op::Release(input)).await?;
        expect!(outcome, Outcome::Release)
    }

    pub async fn adjust(&self, input: AdjustInput) -> Result<AdjustOutcome> {
        let outcome = self.submit(Op::Adjust(input)).await?;
        expect!(outcome, Outcome::Adjust)
    }

    pub async fn grant(&self, input: GrantInput) -> Result<GrantOutcome> {
        let outcome = self.submit(Op::Grant(input)).await?;
        expect!(outcome, Outcome::Grant)
    }

    /// Books the expiries of organization `org_id` now.
    pub(crate) async fn sweep_org(&self, org_id: i64) -> Result<()> {
        self.submit(Op::Sweep(org_id)).await.map(|_| ())
    }

    /// The row id of organization `external_id`, creating it if needed,
    /// outside the writer: for capabilities that need an organization row
    /// before any ledger operation (a payment's customer, an order).
    pub async fn ensure_org(&self, external_id: &str) -> Result<i64> {
        let ids = BTreeSet::from([external_id.to_owned()]);
        self.ensure_orgs_on(&self.inner.db, &ids)
            .await?
            .remove(external_id)
            .ok_or_else(|| Error::internal(format!("organization {external_id} was not created")))
    }

    /// Row ids of `external_ids`, creating the organizations that do not
    /// exist yet (an organization is created on first use), on `db`.
    async fn ensure_orgs_on(
        &self,
        db: &DatabaseConnection,
        external_ids: &BTreeSet<String>,
    ) -> Result<HashMap<String, i64>> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        if let Ok(cache) = self.inner.orgs.read() {
            for ext in external_ids {
                match cache.get(ext) {
                    Some(id) => {
                        found.insert(ext.clone(), *id);
                    }
                    None => missing.push(ext.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let now = self.now();
        {
            let _guard = match &self.inner.write_lock {
                Some(lock) => Some(lock.lock().await),
                None => None,
            };
            organization::Entity::insert_many(missing.iter().map(|ext| {
                organization::ActiveModel {
                    external_id: Set(ext.clone()),
                    balance_micros: Set(0),
                    held_micros: Set(0),
                    ledger_seq: Set(0),
                    stripe_customer_id: Set(None),
                    creem_customer_id: Set(None),
                    last_purchase_attempt_at: Set(None),
                    created_at: Set(now),
                    updated_at: Set(now),
                    ..Default::default()
                }
            }))
            .on_conflict(
                OnConflict::column(organization::Column::ExternalId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        }
        let rows = organization::Entity::find()
            .filter(organization::Column::ExternalId.is_in(missing))
            .all(db)
            .await?;
        if let Ok(mut cache) = self.inner.orgs.write() {
            for row in rows {
                cache.insert(row.external_id.clone(), row.id);
                found.insert(row.external_id, row.id);
            }
        }
        Ok(found)
    }

    /// The row id of organization `external_id`, if it exists.
    pub async fn org_id(&self, external_id: &str) -> Result<Option<i64>> {
        self.org_id_on(&self.inner.db, external_id).await
    }

    async fn org_id_on(&self, db: &DatabaseConnection, external_id: &str) -> Result<Option<i64>> {
        if let Some(id) = self
            .inner
            .orgs
            .read()
            .ok()
            .and_then(|m| m.get(external_id).copied())
        {
            return Ok(Some(id));
        }
        let row = organization::Entity::find()
            .filter(organization::Column::ExternalId.eq(external_id))
            .one(db)
            .await?;
        if let (Some(row), Ok(mut cache)) = (&row, self.inner.orgs.write()) {
            cache.insert(external_id.to_owned(), row.id);
        }
        Ok(row.map(|r| r.id))
    }
}

/// A batch worker: the [`Ledger`]'s state plus its own connection pool, on
/// a thread of its own (see [`Ledger::start`]).
struct Worker {
    ledger: Ledger,
    db: DatabaseConnection,
    queue: mpsc::Receiver<Job>,
}

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

    async fn work(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => None,
                job = self.queue.recv() => job,
            };
            let Some(first) = first else { break };
            let mut batch = first.ops;
            while batch.len() < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(job) => batch.extend(job.ops),
                    Err(_) => break,
                }
            }
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
            let run = std::panic::AssertUnwindSafe(self.run_batch(batch));
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

    /// Executes `ops` (one transaction, or one each after a failure) and
    /// returns one result per op, in order.
    async fn execute(&self, ops: Vec<Op>) -> Vec<Result<Outcome>> {
        let count = ops.len();
        let mut results: Vec<Option<Result<Outcome>>> = (0..count).map(|_| None).collect();
        let mut prepared = Vec::with_capacity(count);
        let mut slots = Vec::with_capacity(count);
        for (slot, op) in self.prepare(ops).await.into_iter().enumerate() {
            match op {
                Ok(p) => {
                    prepared.push(p);
                    slots.push(slot);
                }
                Err(e) => results[slot] = Some(Err(e)),
            }
        }
        if !prepared.is_empty() {
            let outcomes = match self.transact(&prepared).await {
                Ok(outcomes) => outcomes,
                // Only a broken rule (one operation's data) is worth
                // isolating; a database that is down fails every
                // operation alike, and an unknown outcome must never be
                // run again.
                Err(e @ Error::Internal(_)) if prepared.len() > 1 => {
                    tracing::warn!(error = %e, ops = prepared.len(), "batch failed; running its operations one by one");
                    let mut each = Vec::with_capacity(prepared.len());
                    for p in &prepared {
                        let single = self.transact(std::slice::from_ref(p)).await;
                        each.push(single.and_then(|mut v| {
                            v.pop().unwrap_or_else(|| Err(Error::internal("empty")))
                        }));
                    }
                    each
                }
                // The same answer for every operation of the batch.
                Err(e) => prepared.iter().map(|_| Err(e.clone())).collect(),
            };
            for (slot, outcome) in slots.into_iter().zip(outcomes) {
                results[slot] = Some(outcome);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("operation lost in batch"))))
            .collect()
    }

    /// Resolves organizations, costs and idempotency fingerprints.
    async fn prepare(&self, ops: Vec<Op>) -> Vec<Result<Prepared>> {
        let mut externals = BTreeSet::new();
        for op in &ops {
            match op {
                Op::Consume(i) => {
                    externals.insert(i.org.clone());
                }
                Op::Reserve(i) => {
                    externals.insert(i.org.clone());
                }
                Op::Adjust(i) => {
                    externals.insert(i.org.clone());
                }
                Op::Grant(i) => {
                    externals.insert(i.org.clone());
                }
                Op::Commit(_) | Op::Release(_) | Op::Sweep(_) => {}
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
        let rates = self.rates();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(self.prepare_one(op, &orgs, &rates).await);
        }
        out
    }

    async fn prepare_one(
        &self,
        op: Op,
        orgs: &HashMap<String, i64>,
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
                    method: "consume",
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
                let org_id = self.hold_org(&i.reservation_id, i.org.as_deref()).await?;
                let cost = rates.cost(i.meter, i.model.as_deref(), i.quantity)?;
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem: None,
                })
            }
            Op::Release(ref i) => {
                let org_id = self.hold_org(&i.reservation_id, i.org.as_deref()).await?;
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
                let cost = i.amount;
                Ok(Prepared {
                    org_id,
                    op,
                    cost,
                    idem: None,
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

    /// The organization of reservation `id` (checked against `org`).
    async fn hold_org(&self, id: &str, org: Option<&str>) -> Result<i64> {
        let row = reservation::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or(Error::ReservationNotFound)?;
        if let Some(ext) = org
            && self.org_id_on(&self.db, ext).await? != Some(row.org_id)
        {
            return Err(Error::ReservationNotFound);
        }
        Ok(row.org_id)
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
    async fn transact(&self, ops: &[Prepared]) -> Result<Vec<Result<Outcome>>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let _guard = match &self.inner.write_lock {
                Some(lock) => Some(lock.lock().await),
                None => None,
            };
            let now = self.now();
            let result = match self.db.begin().await {
                Err(e) => Err(e),
                Ok(txn) => match apply_batch(&txn, ops, now).await {
                    Ok(outcomes) => match txn.commit().await {
                        Ok(()) => Ok(outcomes),
                        Err(e) => {
                            // The COMMIT may or may not have reached the
                            // database: running the batch again could apply
                            // it twice. Only the callers can resolve it, by
                            // retrying with their idempotency keys.
                            self.written(ops);
                            tracing::warn!(error = %e, ops = ops.len(), "ledger COMMIT failed; outcome unknown");
                            return Err(Error::Unavailable(OUTCOME_UNKNOWN.into()));
                        }
                    },
                    Err(BatchError::Db(e)) => {
                        let _ = txn.rollback().await;
                        Err(e)
                    }
                    Err(BatchError::Rule(e)) => {
                        let _ = txn.rollback().await;
                        self.forget_balances(ops);
                        return Err(e);
                    }
                },
            };
            // After the transaction, whatever its outcome: a balance read
            // while it ran is never kept.
            self.forget_balances(ops);
            match result {
                Ok(outcomes) => {
                    self.ledger.announce(ops.iter().map(|p| p.org_id));
                    return Ok(outcomes);
                }
                Err(e) if attempt < ATTEMPTS && is_transient(&e) => {
                    drop(_guard);
                    tracing::debug!(error = %e, attempt, "retrying ledger batch");
                    tokio::time::sleep(Duration::from_millis(2u64 << attempt)).await;
                }
                // A lost connection becomes UNAVAILABLE here (`From<DbErr>`).
                Err(e) => return Err(e.into()),
            }
        }
    }
}

enum BatchError {
    /// The database failed: maybe transient.
    Db(DbErr),
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
fn monthly_bucket(e: &super::model::Entry) -> &'static str {
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
struct Extra {
    idempotency: Vec<(IdemKey, String)>,
    audits: Vec<admin_audit::ActiveModel>,
}

async fn apply_batch(
    txn: &DatabaseTransaction,
    ops: &[Prepared],
    now: DateTime<Utc>,
) -> Result<Vec<Result<Outcome>>, BatchError> {
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
            .filter_map(|p| match &p.op {
                Op::Commit(i) => Some(i.reservation_id.clone()),
                Op::Release(i) => Some(i.reservation_id.clone()),
                Op::Consume(_) | Op::Reserve(_) | Op::Adjust(_) | Op::Grant(_) | Op::Sweep(_) => {
                    None
                }
            })
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
                Op::Consume(_)
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
    let mut idem_seen: HashMap<(i64, &'static str, String), (String, String)> = HashMap::new();
    for r in loaded.idempotency {
        let method = match r.method.as_str() {
            "consume" => "consume",
            "reserve" => "reserve",
            "manual_adjust" => "manual_adjust",
            _ => continue,
        };
        idem_seen.insert((r.org_id, method, r.key), (r.request_hash, r.response));
    }
    let mut granted_sources = loaded.sources;

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

    // 3. Apply each operation in order.
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
            extra.idempotency.push((idem.clone(), response));
        }
        outcomes.push(result);
    }

    // 4. Write: new lots first (allocations need their ids), then the rest.
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
    let new_lot_ids: HashMap<(i64, usize), i64> = if new_lots.is_empty() {
        HashMap::new()
    } else {
        new_lot_refs
            .into_iter()
            .zip(store::insert_lots(txn, new_lots).await?)
            .collect()
    };
    let rows = changed_rows(&books, extra, now, &new_lot_ids).map_err(BatchError::Rule)?;
    store::write(txn, rows, now).await?;
    Ok(outcomes)
}

fn replay(op: &Op, response: &str) -> Result<Outcome> {
    let bad =
        |e: serde_json::Error| Error::internal(format!("stored idempotent answer unreadable: {e}"));
    Ok(match op {
        Op::Consume(_) => {
            let mut o: ConsumeOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Consume(o)
        }
        Op::Reserve(_) => {
            let mut o: ReserveOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Reserve(o)
        }
        Op::Adjust(_) => {
            let mut o: AdjustOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Adjust(o)
        }
        Op::Commit(_) | Op::Release(_) | Op::Grant(_) | Op::Sweep(_) => {
            return Err(Error::internal("operation has no idempotency key"));
        }
    })
}

fn stored_response(outcome: &Outcome) -> Result<String> {
    let text = match outcome {
        Outcome::Consume(o) => serde_json::to_string(o),
        Outcome::Reserve(o) => serde_json::to_string(o),
        Outcome::Adjust(o) => serde_json::to_string(o),
        Outcome::Commit(_) | Outcome::Release(_) | Outcome::Grant(_) | Outcome::Swept => {
            return Err(Error::internal("operation has no idempotency key"));
        }
    };
    text.map_err(|e| Error::internal(format!("cannot store answer: {e}")))
}

fn apply_one(
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
                    "amount_micros": i.amount,
                    "transaction_id": transaction_id,
                    "expires_at": i.expires_at,
                    "idempotency_key": i.key,
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
            Ok(Outcome::Grant(GrantOutcome {
                transaction_id,
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
            if let LotRef::Stored(id) = lot.id
                && lot.dirty
            {
                rows.lot_updates.push(LotUpdate {
                    id,
                    remaining_micros: lot.remaining,
                });
            }
        }
        for e in &book.entries {
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
