//! An organization's balance as reads report it, and the cache that lets
//! most reads skip the database.
//!
//! The rule that keeps the cache exact for this process's own writes: the
//! ledger's write side bumps an organization's version after every write
//! transaction, before any caller is answered, and
//! [`super::reads::balance`] keeps what it read only if the version did not
//! move while it read. A value read while a write was under way is never
//! kept, and a read after an acknowledged write never sees a value from
//! before it.
//!
//! On SQLite this process is the only writer, so that is the whole story.
//! On PostgreSQL other replicas write too: after each commit the writer
//! sends the ids of the organizations it wrote with `pg_notify`
//! ([`announce`]), and every replica listens ([`listen`]) and bumps those
//! versions when the notification arrives, a millisecond or two after the
//! commit. (Notifying inside the write transaction would be tighter, but
//! PostgreSQL serializes the commits of notifying transactions: measured,
//! it cost a third of `Consume` throughput.) Two more bounds
//! cover what a notification cannot: while the listening connection is
//! down nothing is cached (and everything is forgotten when it comes back),
//! and no entry is kept longer than [`MAX_AGE_SHARED`], so a lost
//! notification can make another replica's write late by at most that.
//! Every entry also ends at the organization's next lot or hold expiry and
//! at the month's end, so expiries show at once.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

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

/// The PostgreSQL channel that carries the ids of written organizations.
pub(crate) const CHANNEL: &str = "billing_balances";

/// Longest a balance is kept when other processes write to the same
/// database: the bound on how late another replica's write can show here
/// if its notification is lost.
pub const MAX_AGE_SHARED: Duration = Duration::from_secs(1);

/// Organizations kept at most; past it the cache starts over (a bound on
/// memory, not a correctness rule).
const MAX_ENTRIES: usize = 100_000;

/// A version: the cache's epoch (bumped when everything is forgotten) and
/// the organization's own counter.
pub(crate) type Version = (u64, u64);

/// Per organization: a version bumped by every write, and the balance last
/// read at that version with the instants it stops being true.
pub(crate) struct BalanceCache {
    entries: HashMap<i64, (u64, Option<Cached>)>,
    epoch: u64,
    /// False while writes of other processes could go unnoticed (the
    /// listening connection is down, or not up yet): nothing is kept.
    serving: bool,
    /// Longest an entry is kept (`None`: no other writer exists).
    max_age: Option<Duration>,
}

struct Cached {
    balance: Balance,
    /// The next lot or hold expiry, or the month's end.
    until: DateTime<Utc>,
    /// `max_age` after the read.
    fresh_until: Option<Instant>,
}

impl BalanceCache {
    /// A cache for the only writer of its database (SQLite).
    pub(crate) fn single_writer() -> Self {
        Self {
            entries: HashMap::new(),
            epoch: 0,
            serving: true,
            max_age: None,
        }
    }

    /// A cache for one of several writers: it serves nothing until
    /// [`Self::resume`] says other writers' notifications are heard.
    pub(crate) fn shared() -> Self {
        Self {
            entries: HashMap::new(),
            epoch: 0,
            serving: false,
            max_age: Some(MAX_AGE_SHARED),
        }
    }

    pub(crate) fn version(&self, org: i64) -> Version {
        (self.epoch, self.entries.get(&org).map_or(0, |e| e.0))
    }

    pub(crate) fn get(&self, org: i64, now: DateTime<Utc>) -> Option<Balance> {
        if !self.serving {
            return None;
        }
        match self.entries.get(&org) {
            Some((_, Some(c)))
                if now < c.until && c.fresh_until.is_none_or(|t| Instant::now() < t) =>
            {
                Some(c.balance.clone())
            }
            _ => None,
        }
    }

    /// Keeps `balance`, read at `version` (taken before the read began),
    /// only if no write was noticed since.
    pub(crate) fn put(
        &mut self,
        org: i64,
        version: Version,
        balance: Balance,
        until: DateTime<Utc>,
    ) {
        if !self.serving || version != self.version(org) {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&org) {
            self.forget_all();
            return;
        }
        let fresh_until = self.max_age.map(|age| Instant::now() + age);
        let entry = self.entries.entry(org).or_insert((0, None));
        entry.1 = Some(Cached {
            balance,
            until,
            fresh_until,
        });
    }

    /// Organization `org` was written to.
    pub(crate) fn invalidate(&mut self, org: i64) {
        let entry = self.entries.entry(org).or_insert((0, None));
        entry.0 += 1;
        entry.1 = None;
    }

    /// Writes may have gone unnoticed: forget everything, keep nothing
    /// until [`Self::resume`].
    pub(crate) fn suspend(&mut self) {
        self.serving = false;
        self.forget_all();
    }

    /// Other writers' notifications are heard again (from now on).
    pub(crate) fn resume(&mut self) {
        self.forget_all();
        self.serving = true;
    }

    fn forget_all(&mut self) {
        self.entries.clear();
        self.epoch += 1;
    }
}

/// The payloads of notifications naming `org_ids`: ids, comma separated,
/// each payload under PostgreSQL's limit of 8000 bytes.
pub(crate) fn payloads(org_ids: impl IntoIterator<Item = i64>) -> Vec<String> {
    let mut out = vec![String::new()];
    for id in org_ids {
        let id = id.to_string();
        let last = out.last_mut().map_or(0, |p| p.len());
        if last + id.len() + 1 > 7900 {
            out.push(String::new());
        }
        if let Some(p) = out.last_mut() {
            if !p.is_empty() {
                p.push(',');
            }
            p.push_str(&id);
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The least time between two notifications from one replica.
///
/// Every notification is a transaction of its own that PostgreSQL commits
/// and delivers to every listener. Sent as soon as the previous one was
/// done, a busy replica sent nearly one per batch (measured: 0.8); held
/// for this long, everything written meanwhile shares one. It adds at
/// most this much to how late another replica sees a write.
pub const NOTIFY_GAP: Duration = Duration::from_millis(2);

/// Tells the other replicas which organizations this one wrote, after the
/// commits: everything queued while one notification is on its way, and
/// for [`NOTIFY_GAP`] after it, goes into the next (so a busy writer sends
/// few). A notification that cannot be sent is logged; the other replicas
/// then see the write within [`MAX_AGE_SHARED`].
pub(crate) async fn announce(
    db: sea_orm::DatabaseConnection,
    mut written: tokio::sync::mpsc::UnboundedReceiver<Vec<i64>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            ids = written.recv() => match ids {
                Some(ids) => ids,
                None => return,
            },
        };
        let mut ids: std::collections::BTreeSet<i64> = first.into_iter().collect();
        while let Ok(more) = written.try_recv() {
            ids.extend(more);
        }
        for payload in payloads(ids) {
            let sent = db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT pg_notify($1, $2)",
                    [CHANNEL.into(), payload.into()],
                ))
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "balance cache: cannot notify the other replicas");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(NOTIFY_GAP) => {}
        }
    }
}

/// Applies one notification's payload to `cache`; an unreadable one
/// forgets everything.
pub(crate) fn apply_payload(cache: &mut BalanceCache, payload: &str) {
    let ids: Option<Vec<i64>> = payload
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect();
    match ids {
        Some(ids) => ids.into_iter().for_each(|id| cache.invalidate(id)),
        None => cache.forget_all(),
    }
}

/// Listens for other processes' writes on `database_url` (PostgreSQL) and
/// invalidates `cache` accordingly, until `stop`. The cache serves only
/// while the listening connection is up.
pub(crate) async fn listen(
    database_url: String,
    cache: std::sync::Arc<std::sync::Mutex<BalanceCache>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use sea_orm::sqlx::postgres::PgListener;
    let with_cache = |f: &dyn Fn(&mut BalanceCache)| {
        if let Ok(mut c) = cache.lock() {
            f(&mut c);
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect(&database_url).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = stop.cancelled() => return,
            l = connected => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "balance cache: cannot listen for other replicas' writes; reads go to the database");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(100);
        with_cache(&|c| c.resume());
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    let payload = n.payload().to_owned();
                    with_cache(&|c| apply_payload(c, &payload));
                }
                // The connection dropped and was re-established (it
                // listens again): what was sent meanwhile is lost.
                Ok(None) => {
                    tracing::info!("balance cache: listening connection re-established");
                    with_cache(&|c| c.resume());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "balance cache: listening connection lost");
                    with_cache(&|c| c.suspend());
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balance(stored: i64) -> Balance {
        Balance {
            stored,
            ..Balance::default()
        }
    }

    fn later() -> DateTime<Utc> {
        Utc::now() + chrono::TimeDelta::days(1)
    }

    #[test]
    fn a_write_during_a_read_keeps_the_read_out() {
        let mut c = BalanceCache::single_writer();
        let v = c.version(1);
        c.invalidate(1);
        c.put(1, v, balance(5), later());
        assert_eq!(c.get(1, Utc::now()), None);
        let v = c.version(1);
        c.put(1, v, balance(6), later());
        assert_eq!(c.get(1, Utc::now()), Some(balance(6)));
    }

    #[test]
    fn an_entry_ends_at_its_expiry() {
        let mut c = BalanceCache::single_writer();
        let until = Utc::now();
        c.put(1, c.version(1), balance(5), until);
        assert_eq!(c.get(1, until), None);
    }

    #[test]
    fn a_shared_cache_serves_only_while_listening() {
        let mut c = BalanceCache::shared();
        c.put(1, c.version(1), balance(5), later());
        assert_eq!(c.get(1, Utc::now()), None, "not listening yet");
        c.resume();
        c.put(1, c.version(1), balance(5), later());
        assert_eq!(c.get(1, Utc::now()), Some(balance(5)));
        let v = c.version(2);
        c.suspend();
        assert_eq!(c.get(1, Utc::now()), None, "suspended");
        c.resume();
        c.put(2, v, balance(7), later());
        assert_eq!(c.get(2, Utc::now()), None, "read from before the gap");
    }

    #[test]
    fn payloads_stay_under_the_notification_limit() {
        let ids: Vec<i64> = (0..2000).map(|i| i64::MAX - i).collect();
        let parts = payloads(ids.iter().copied());
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.len() < 8000));
        let back: Vec<i64> = parts
            .iter()
            .flat_map(|p| p.split(','))
            .map(|s| s.parse().unwrap_or_default())
            .collect();
        assert_eq!(back, ids);
    }

    #[test]
    fn notifications_invalidate_the_named_organizations() {
        let mut c = BalanceCache::single_writer();
        for org in [1, 2, 3] {
            c.put(org, c.version(org), balance(org), later());
        }
        for p in payloads([1, 3]) {
            apply_payload(&mut c, &p);
        }
        assert_eq!(c.get(1, Utc::now()), None);
        assert_eq!(c.get(2, Utc::now()), Some(balance(2)));
        assert_eq!(c.get(3, Utc::now()), None);
        apply_payload(&mut c, "garbage");
        assert_eq!(c.get(2, Utc::now()), None);
    }
}
