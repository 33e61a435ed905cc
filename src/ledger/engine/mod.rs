//! Every ledger write, batched: one database transaction per batch.
//!
//! Callers hand an operation to [`Ledger`]; it goes to the queue of the
//! process's one writer. The writer runs on a thread of its own with its
//! own runtime and connection pool, so its round trips never wait behind
//! request handling. It takes whatever has queued up (up to [`MAX_BATCH`])
//! and runs it as one transaction:
//!
//! 1. lock the organizations' rows in id order (`SELECT … FOR UPDATE` on
//!    PostgreSQL; on SQLite this process's single writer lock), so replicas
//!    never interleave on one organization and never deadlock each other;
//! 2. load each organization's live lots, the holds the batch names or that
//!    have expired, and the stored answers of the batch's keys (idempotency
//!    records; a `Consume`'s ledger row is its own record, see
//!    `batch::ConsumeKey`);
//! 3. sweep expiries, then apply each operation through [`super::model`], in
//!    arrival order: a refused operation (insufficient credits, key reused)
//!    changes nothing and does not affect the others;
//! 4. write every change and commit.
//!
//! Steps 1, 2 and 4 are `store`'s: on PostgreSQL one statement
//! locks and loads and one statement writes, so a batch is four round trips
//! whatever its size. The organizations whose operations are all
//! `Consume`s and whose state the writer knows from its own last batch are
//! split off into a part of the batch of their own, run beside the rest:
//! it skips steps 1 and 2 and writes in one autocommitted statement that
//! checks nothing changed meanwhile (see `batch::Warm`): one round trip.
//!
//! The parts: `ops` (the operations and how each applies to a book),
//! `idempotency` (fingerprints and stored answers), `worker` (the queue
//! consumer: gathering, preparing, the transaction and its retries) and
//! `batch` (one batch inside its transaction: load, apply, the row diff).
//! Adding an operation is adding a variant to [`Op`] and [`Outcome`] and
//! following the compiler: every match over them is exhaustive.
//!
//! Answers are released only after the commit. A transient failure
//! (serialization, deadlock, busy, lost connection) retries the whole batch;
//! any other failure of a multi-operation batch re-runs its operations one
//! by one so one bad operation cannot fail its neighbours.

mod batch;
mod idempotency;
mod ops;
mod worker;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    sea_query::OnConflict,
};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use ops::{Op, Outcome};

use super::{
    AdjustInput, AdjustOutcome, CommitInput, CommitOutcome, ConsumeInput, ConsumeOutcome,
    GrantInput, GrantOutcome, Rates, ReleaseInput, ReleaseOutcome, ReserveInput, ReserveOutcome,
    SettleInput, SettleOutcome, TakeBackInput, TakeBackOutcome, VoidInput, VoidOutcome,
    balance::BalanceCache,
};
use crate::{
    clock::SharedClock,
    entities::organization,
    error::{Error, Result},
};
use worker::Worker;

/// Most operations one transaction carries.
pub const MAX_BATCH: usize = 256;

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
    /// The caller's `ledger.write` span: the batch's span is its child (the
    /// first job's) or linked from it (the others').
    span: tracing::Span,
}

/// How many operations may wait in one writer queue by default
/// (`LEDGER_QUEUE_DEPTH`). Past it, callers are refused at once
/// (RESOURCE_EXHAUSTED) rather than left waiting without bound behind a
/// writer that cannot keep up.
pub const DEFAULT_QUEUE_DEPTH: usize = 4096;

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
    counts: BatchCounts,
}

/// How batches ran, since the start (for operators and tests).
#[derive(Debug, Default)]
pub struct BatchCounts {
    /// Written from a warm state, without loading (PostgreSQL).
    pub warm: std::sync::atomic::AtomicU64,
    /// Tried warm, not written, run again locked.
    pub warm_fallbacks: std::sync::atomic::AtomicU64,
    /// Run on the locking path (committed).
    pub locked: std::sync::atomic::AtomicU64,
}

/// The ledger's write side and its caches. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
    /// The writer's queue.
    sender: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Ledger {
    /// Starts the writer: reads go through `db`, writes through a pool of
    /// the writer's own on `database_url`; its queue holds at most
    /// `queue_depth` operations. It stops when `shutdown` is cancelled,
    /// after finishing the batch in hand.
    pub async fn start(
        db: DatabaseConnection,
        database_url: &str,
        clock: SharedClock,
        shutdown: CancellationToken,
        queue_depth: usize,
        rate_refresh: Duration,
    ) -> Result<Self> {
        let database_url = database_url.to_owned();
        let database_url_for_listener = database_url.clone();
        let rates = Rates::load(&db).await?;
        let sqlite = db.get_database_backend() == DbBackend::Sqlite;
        // One writer per process, on both backends. SQLite writes one
        // transaction at a time anyway. On PostgreSQL a second writer (each
        // owning half of the organizations) kept a second batch in the
        // database, but every batch got half as big, and the statements'
        // cost is mostly per batch: one writer did 11.4–13.9k `Consume`/s
        // where two did 9.9–12.1k and four 8.8–10.0k (paired runs, see the
        // README). More replicas add writers where more are needed.
        let (sender, receiver) = mpsc::channel(queue_depth.max(1));
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
                counts: BatchCounts::default(),
                balances: Arc::new(std::sync::Mutex::new(if sqlite {
                    BalanceCache::single_writer()
                } else {
                    BalanceCache::shared()
                })),
            }),
            sender,
        };
        // The writer runs on a thread of its own, with its own runtime and
        // connections, so its database round trips never wait behind
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
                    // Two connections: a batch's warm part and the rest run
                    // at once, one connection each.
                    let db = match crate::db::connect_writer(&database_url, 2).await {
                        Ok(db) => db,
                        Err(e) => {
                            let _ = ready.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    let worker = Worker {
                        ledger: worker_ledger,
                        db: db.clone(),
                        queue: receiver,
                        warm: Default::default(),
                    };
                    let _ = tokio::spawn(worker.work(worker_stop)).await;
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
                    () = tokio::time::sleep(rate_refresh) => {}
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

    /// How batches ran so far.
    pub fn batch_counts(&self) -> &BatchCounts {
        &self.inner.counts
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
        let span = tracing::info_span!(
            "ledger.write",
            otel.name = %format_args!("ledger {}", ops.first().map_or("nothing", Op::kind)),
            operations = ops.len(),
        );
        let answers = {
            let _entered = span.enter();
            self.enqueue(ops, span.clone())?
        };
        let wait = async move {
            let mut out = Vec::with_capacity(answers.len());
            for answer in answers {
                out.push(answer.await.map_err(|_| {
                    Error::Unavailable("the ledger stopped before answering".into())
                })?);
            }
            Ok(out)
        };
        tracing::Instrument::instrument(wait, span).await
    }

    /// Jobs waiting in the writer's queue (a job is one call's operations).
    pub fn queue_depth(&self) -> usize {
        self.sender
            .max_capacity()
            .saturating_sub(self.sender.capacity())
    }

    /// Puts `ops` on the writer's queue, as one job.
    fn enqueue(
        &self,
        ops: Vec<Op>,
        span: tracing::Span,
    ) -> Result<Vec<oneshot::Receiver<Result<Outcome>>>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (ops, answers): (Vec<_>, Vec<_>) = ops
            .into_iter()
            .map(|op| {
                let (reply, answer) = oneshot::channel();
                ((op, reply), answer)
            })
            .unzip();
        self.sender
            .try_send(Job { ops, span })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    Error::Unavailable("the ledger is shutting down".into())
                }
            })?;
        Ok(answers)
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

    pub async fn settle(&self, input: SettleInput) -> Result<SettleOutcome> {
        let outcome = self.submit(Op::Settle(input)).await?;
        expect!(outcome, Outcome::Settle)
    }

    pub async fn void(&self, input: VoidInput) -> Result<VoidOutcome> {
        let outcome = self.submit(Op::Void(input)).await?;
        expect!(outcome, Outcome::Void)
    }

    pub async fn take_back(&self, input: TakeBackInput) -> Result<TakeBackOutcome> {
        let outcome = self.submit(Op::TakeBack(input)).await?;
        expect!(outcome, Outcome::TakeBack)
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
