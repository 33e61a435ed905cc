//! Many concurrent callers against two replicas on one PostgreSQL database
//! (and one instance on SQLite): consumes, holds with commit or release,
//! replayed idempotency keys, manual grants and debits, lots and holds
//! that expire during the run, spread over a few organizations. Afterwards
//! every ledger invariant holds, and the credits that moved are exactly
//! what callers were told succeeded (less what expired): nothing
//! overdrawn, double-charged, double-granted or lost.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use billing::{
    auth::{JwtKeys, Role},
    clock::SystemClock,
    entities::organization,
    pb,
};
use chrono::Utc;
use common::{
    Backend, JWT_SECRET, TestDb, authed, backends, connect, invariants, reason, start_on,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sea_orm::{ConnectionTrait, EntityTrait, TransactionTrait};
use tonic::transport::Channel;

const CREDIT: i64 = 1_000_000;
const ORGS: [&str; 3] = ["org-a", "org-b", "org-c"];
const CALLERS: usize = 64;
const OPS_PER_CALLER: usize = 14;
const INITIAL: i64 = 40 * CREDIT;

/// What callers were told, per organization.
#[derive(Default, Debug)]
struct Tally {
    granted: i64,
    charged: i64,
    debited: i64,
    /// idempotency key → (transaction id, answers not marked duplicate)
    consume_keys: HashMap<String, (String, u32)>,
    grant_keys: HashMap<String, (String, u32)>,
    commits: usize,
    debits: usize,
    /// The latest expiry of a short-lived lot or an abandoned hold.
    latest_expiry: Option<chrono::DateTime<Utc>>,
}

impl Tally {
    fn expires(&mut self, at: chrono::DateTime<Utc>) {
        self.latest_expiry = self.latest_expiry.max(Some(at));
    }
}

fn timestamp(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A consume whose parameters are fixed by its key, so replays match.
fn shared_consume(org: &str, k: u32) -> (String, i64) {
    (format!("dup-{org}-{k}"), 100_000 * i64::from(k + 1))
}

async fn caller(id: usize, channel: Channel, tally: Arc<Mutex<HashMap<String, Tally>>>) {
    let keys = JwtKeys::new(JWT_SECRET.to_owned().into());
    let now = Utc::now().timestamp();
    let service = keys.issue("svc", "internal", Role::Service, now, 3600);
    let admin = keys.issue("root", "ops", Role::Admin, now, 3600);
    let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
    let mut admin_client = pb::admin_service_client::AdminServiceClient::new(channel);
    let mut rng = StdRng::seed_from_u64(id as u64);

    for n in 0..OPS_PER_CALLER {
        let org = ORGS[rng.random_range(0..ORGS.len())];
        let roll = rng.random_range(0..100);
        if roll < 45 {
            let (key, quantity) = if rng.random_bool(0.3) {
                shared_consume(org, rng.random_range(0..4))
            } else {
                (format!("c-{id}-{n}"), rng.random_range(50_000..1_500_000))
            };
            let request = pb::ConsumeRequest {
                org_id: org.into(),
                meter: "ai_tokens".into(),
                quantity,
                idempotency_key: key.clone(),
                ..Default::default()
            };
            match usage.consume(authed(&service, request)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let mut t = tally.lock().expect("tally");
                    let t = t.entry(org.into()).or_default();
                    // Answers to concurrent replays may arrive in any order:
                    // the charge is counted on the one answer not marked
                    // duplicate, and every answer names the same transaction.
                    let entry = t
                        .consume_keys
                        .entry(key)
                        .or_insert_with(|| (r.transaction_id.clone(), 0));
                    assert_eq!(
                        entry.0, r.transaction_id,
                        "a replay answered another transaction"
                    );
                    if !r.duplicate {
                        entry.1 += 1;
                        t.charged += r.charged_micros;
                    }
                }
                Err(e) => assert_eq!(reason(&e), "INSUFFICIENT_CREDITS", "{e:?}"),
            }
        } else if roll < 75 {
            let amount = rng.random_range(CREDIT / 2..3 * CREDIT);
            // Some holds are abandoned and left to expire.
            let abandon = rng.random_bool(0.15);
            let request = pb::ReserveRequest {
                org_id: org.into(),
                amount_micros: Some(amount),
                idempotency_key: format!("r-{id}-{n}"),
                ttl_seconds: abandon.then_some(1),
                ..Default::default()
            };
            let hold = match usage.reserve(authed(&service, request)).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    assert_eq!(reason(&e), "INSUFFICIENT_CREDITS", "{e:?}");
                    continue;
                }
            };
            if abandon {
                let at = hold.expires_at.expect("expires_at");
                let at =
                    chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).expect("a time");
                tally
                    .lock()
                    .expect("tally")
                    .entry(org.into())
                    .or_default()
                    .expires(at);
            } else if rng.random_bool(0.6) {
                let request = pb::CommitRequest {
                    reservation_id: hold.reservation_id,
                    meter: "ai_tokens".into(),
                    quantity: rng.random_range(0..2_000_000),
                    ..Default::default()
                };
                let r = usage
                    .commit(authed(&service, request))
                    .await
                    .expect("commit")
                    .into_inner();
                let mut t = tally.lock().expect("tally");
                let t = t.entry(org.into()).or_default();
                t.charged += r.charged_micros;
                t.commits += 1;
            } else {
                let request = pb::ReleaseRequest {
                    reservation_id: hold.reservation_id,
                };
                let r = usage
                    .release(authed(&service, request))
                    .await
                    .expect("release")
                    .into_inner();
                assert_eq!(r.released_micros, hold.held_micros);
            }
        } else if roll < 90 {
            // Grants; some keys are shared so replicas race on them.
            let k = rng.random_range(0..6);
            let (key, amount, expires_at) = if rng.random_bool(0.5) {
                (format!("g-{org}-{k}"), i64::from(k + 1) * CREDIT, None)
            } else {
                // Half of these are large lots that expire while the run
                // goes on, before they can all be spent (they are spent
                // first: earliest expiry first).
                if rng.random_bool(0.5) {
                    let expires_at =
                        Utc::now() + chrono::TimeDelta::milliseconds(rng.random_range(100..400));
                    (
                        format!("g-{id}-{n}"),
                        rng.random_range(20..60) * CREDIT,
                        Some(expires_at),
                    )
                } else {
                    (format!("g-{id}-{n}"), rng.random_range(1..5) * CREDIT, None)
                }
            };
            let request = pb::ManualAdjustRequest {
                org_id: org.into(),
                amount_micros: amount,
                reason: "top-up".into(),
                expires_at: expires_at.map(timestamp),
                idempotency_key: Some(key.clone()),
            };
            let r = admin_client
                .manual_adjust(authed(&admin, request))
                .await
                .expect("grant")
                .into_inner();
            let mut t = tally.lock().expect("tally");
            let t = t.entry(org.into()).or_default();
            if let Some(at) = expires_at {
                t.expires(at);
            }
            let entry = t
                .grant_keys
                .entry(key)
                .or_insert_with(|| (r.transaction_id.clone(), 0));
            assert_eq!(entry.0, r.transaction_id, "a replay answered another grant");
            if !r.duplicate {
                entry.1 += 1;
                t.granted += amount;
            }
        } else {
            let request = pb::ManualAdjustRequest {
                org_id: org.into(),
                amount_micros: -CREDIT,
                reason: "correction".into(),
                ..Default::default()
            };
            match admin_client.manual_adjust(authed(&admin, request)).await {
                Ok(_) => {
                    let mut t = tally.lock().expect("tally");
                    let t = t.entry(org.into()).or_default();
                    t.debited += CREDIT;
                    t.debits += 1;
                }
                Err(e) => assert_eq!(reason(&e), "INSUFFICIENT_CREDITS", "{e:?}"),
            }
        }
    }
}

async fn run(backend: Backend, replicas: usize) {
    let db = TestDb::new(backend).await;
    let mut servers = Vec::new();
    for _ in 0..replicas {
        servers.push(start_on(&db.url, &[], Arc::new(SystemClock)).await);
    }
    let mut channels = Vec::new();
    for s in &servers {
        channels.push(connect(s.grpc_addr).await);
    }

    // Seed each organization through the first replica.
    for org in ORGS {
        grant(&channels[0], org, INITIAL).await;
    }

    let tally: Arc<Mutex<HashMap<String, Tally>>> = Arc::default();
    let mut tasks = Vec::new();
    for id in 0..CALLERS {
        let channel = channels[id % channels.len()].clone();
        tasks.push(tokio::spawn(caller(id, channel, tally.clone())));
    }
    for task in tasks {
        task.await.expect("caller");
    }

    // Once every short-lived lot and abandoned hold has expired, the
    // sweep books what no write has booked yet.
    let latest = tally
        .lock()
        .expect("tally")
        .values()
        .filter_map(|t| t.latest_expiry)
        .max();
    while latest.is_some_and(|at| Utc::now() <= at) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    billing::ledger::sweeper::sweep_all(&servers[0].state.ledger)
        .await
        .expect("sweep");

    let conn = &servers[0].state.db;
    invariants::check(conn, Utc::now()).await;
    let orgs: HashMap<String, organization::Model> = organization::Entity::find()
        .all(conn)
        .await
        .expect("orgs")
        .into_iter()
        .map(|o| (o.external_id.clone(), o))
        .collect();
    let rows = invariants::rows_by_org(conn).await;
    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let mut total_expired = 0;
    for org in ORGS {
        let t = tally.get(org).expect("every org was used");
        let o = &orgs[org];
        let org_rows = &rows[org];
        let expired: i64 = org_rows
            .iter()
            .filter(|r| r.kind == "expiry")
            .map(|r| -r.amount_micros)
            .sum();
        total_expired += expired;
        assert_eq!(
            o.balance_micros,
            INITIAL + t.granted - t.charged - t.debited - expired,
            "{backend:?} {org}: the balance is not what callers were told"
        );
        assert_eq!(o.held_micros, 0, "every hold was committed or released");
        let read = billing::ledger::reads::balance(&servers[0].state.ledger, org)
            .await
            .expect("read");
        assert_eq!(
            (read.stored, read.realtime),
            (o.balance_micros, 0),
            "{org}: a read disagrees with the ledger"
        );
        for (key, (_, firsts)) in t.consume_keys.iter().chain(&t.grant_keys) {
            assert_eq!(
                *firsts, 1,
                "{org}: {key} was answered as a first charge {firsts} times"
            );
        }
        let usage: Vec<_> = org_rows.iter().filter(|r| r.kind == "ai_usage").collect();
        assert_eq!(
            usage.len(),
            t.consume_keys.len(),
            "{org}: one charge per idempotency key"
        );
        for row in &usage {
            let key = row.reference_id.clone().unwrap_or_default();
            assert_eq!(
                t.consume_keys.get(&key).map(|(id, _)| id),
                Some(&row.id),
                "{org}: charge for {key} not the one answered"
            );
        }
        assert_eq!(
            org_rows.iter().filter(|r| r.kind == "reservation").count(),
            t.commits
        );
        assert_eq!(
            org_rows.iter().filter(|r| r.kind == "manual").count(),
            1 + t.grant_keys.len() + t.debits,
            "{org}: one row per granted key and per debit"
        );
    }
    assert!(
        total_expired > 0,
        "{backend:?}: no credits expired, the run did not exercise expiry"
    );
    for s in servers {
        s.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_never_lose_or_double_count() {
    for backend in backends() {
        match backend {
            // Any number of replicas on one PostgreSQL: two here.
            Backend::Postgres => run(backend, 2).await,
            // SQLite is the single-instance embedded default.
            Backend::Sqlite => run(backend, 1).await,
        }
    }
}

/// Grants `amount` µcr to `org` through `channel`, as an admin's manual
/// adjustment; returns the balance after it.
async fn grant(channel: &Channel, org: &str, amount: i64) -> i64 {
    let keys = JwtKeys::new(JWT_SECRET.to_owned().into());
    let admin = keys.issue("root", "ops", Role::Admin, Utc::now().timestamp(), 3600);
    pb::admin_service_client::AdminServiceClient::new(channel.clone())
        .manual_adjust(authed(
            &admin,
            pb::ManualAdjustRequest {
                org_id: org.into(),
                amount_micros: amount,
                reason: "initial".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("grant")
        .into_inner()
        .balance_micros
}

/// A PostgreSQL server whose `orgs` were granted `amount` each, with
/// tokens and a channel; `None` when the run has no PostgreSQL.
struct Granted {
    server: common::TestServer,
    admin: String,
    service: String,
    channel: Channel,
}

async fn postgres_server_granting(orgs: &[&str], amount: i64) -> Option<Granted> {
    if !backends().contains(&Backend::Postgres) {
        return None;
    }
    let server = common::TestServer::start(Backend::Postgres).await;
    let admin = server.token(Role::Admin, "ops");
    let service = server.token(Role::Service, "internal");
    let channel = server.channel().await;
    for org in orgs {
        grant(&channel, org, amount).await;
    }
    Some(Granted {
        server,
        admin,
        service,
        channel,
    })
}

/// A write that another replica commits while a batch waits for the row
/// lock is seen by that batch. The batch's lock-and-load statement reads a
/// snapshot taken before the lock was granted; here the "other replica"
/// (a plain transaction) spends one credit of the only lot while holding
/// the lock, and the service's next charge must start from what it left.
/// Only PostgreSQL has this race (SQLite has one writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_committed_under_the_lock_is_seen() {
    let Some(Granted {
        server,
        service,
        channel,
        ..
    }) = postgres_server_granting(&["race"], 5 * CREDIT).await
    else {
        return;
    };

    // The other replica: lock the organization and spend one credit of
    // its lot, as a ledger write would.
    let other = sea_orm::Database::connect(&server.db.url)
        .await
        .expect("connect");
    let txn = other.begin().await.expect("begin");
    txn.execute_unprepared(
        "SELECT id FROM organizations WHERE external_id = 'race' FOR UPDATE; \
         UPDATE credit_lots SET remaining_micros = remaining_micros - 1000000 \
          WHERE org_id = (SELECT id FROM organizations WHERE external_id = 'race'); \
         UPDATE organizations SET balance_micros = balance_micros - 1000000, \
          ledger_seq = ledger_seq + 1 WHERE external_id = 'race'",
    )
    .await
    .expect("the other replica's write");

    // A charge arrives meanwhile and waits for the lock.
    let mut usage = pb::usage_service_client::UsageServiceClient::new(channel);
    let charge = tokio::spawn(async move {
        usage
            .consume(authed(
                &service,
                pb::ConsumeRequest {
                    org_id: "race".into(),
                    meter: "storage_egress".into(),
                    quantity: 1,
                    idempotency_key: "after-the-race".into(),
                    ..Default::default()
                },
            ))
            .await
    });
    let waiting = "SELECT count(*) AS n FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    loop {
        let row = other
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                waiting,
            ))
            .await
            .expect("pg_stat_activity")
            .expect("a row");
        if row.try_get::<i64>("", "n").expect("count") > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    txn.commit().await.expect("commit");

    let charged = charge
        .await
        .expect("task")
        .expect("the charge succeeds")
        .into_inner();
    let lots: i64 = other
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT CAST(sum(remaining_micros) AS BIGINT) AS s FROM credit_lots \
             WHERE org_id = (SELECT id FROM organizations WHERE external_id = 'race')",
        ))
        .await
        .expect("lots")
        .expect("a row")
        .try_get("", "s")
        .expect("sum");
    let expected = 4 * CREDIT - charged.charged_micros;
    assert_eq!(
        charged.balance_micros, expected,
        "the charge saw a stale balance"
    );
    assert_eq!(lots, expected, "the charge spent from a stale lot");
    other.close().await.expect("close");
    server.stop().await;
}

/// PostgreSQL restarts, fails over or terminates sessions under load: the
/// writer reconnects, callers see UNAVAILABLE (never INTERNAL), no
/// acknowledged write is lost and none is applied twice, and no request
/// sent once is answered as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_database_sessions_lose_and_double_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(Granted {
        server,
        admin,
        service,
        channel,
    }) = postgres_server_granting(&ORGS, 1_000_000 * CREDIT).await
    else {
        return;
    };

    // What each request was told: Ok(answer) or the status code.
    type Told = Vec<(String, &'static str, Result<bool, tonic::Code>)>;
    let told: Arc<Mutex<Told>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for id in 0..16 {
        let (channel, told, stop) = (channel.clone(), told.clone(), stop.clone());
        let (service, admin) = (service.clone(), admin.clone());
        callers.push(tokio::spawn(async move {
            let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
            let mut adm = pb::admin_service_client::AdminServiceClient::new(channel);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let org = ORGS[n % ORGS.len()];
                let key = format!("c{id}-{n}");
                let (kind, result) = if n % 5 == 0 {
                    // A keyless adjustment: its unique reason finds its row.
                    let r = adm
                        .manual_adjust(authed(
                            &admin,
                            pb::ManualAdjustRequest {
                                org_id: org.into(),
                                amount_micros: -CREDIT,
                                reason: key.clone(),
                                ..Default::default()
                            },
                        ))
                        .await;
                    ("manual", r.map(|r| r.into_inner().duplicate))
                } else {
                    let r = usage
                        .consume(authed(
                            &service,
                            pb::ConsumeRequest {
                                org_id: org.into(),
                                meter: "storage_egress".into(),
                                quantity: 1_000_000_000,
                                idempotency_key: key.clone(),
                                ..Default::default()
                            },
                        ))
                        .await;
                    ("consume", r.map(|r| r.into_inner().duplicate))
                };
                let result = result.map_err(|s| s.code());
                told.lock().expect("told").push((key, kind, result));
            }
        }));
    }

    // Terminate every other session of the database, again and again.
    let killer = sea_orm::Database::connect(&server.db.url)
        .await
        .expect("connect");
    let kill = "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
                WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let mut killed = 0;
    for _ in 0..12 {
        // Let some writes through between the kills.
        let before = told.lock().expect("told").len();
        while told.lock().expect("told").len() < before + 40 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let row = killer
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                kill,
            ))
            .await
            .expect("terminate")
            .expect("a row");
        killed += row.try_get::<i64>("", "n").expect("count");
    }
    // And the service recovers: writes succeed again.
    let after = told.lock().expect("told").len();
    loop {
        let recovered = {
            let told = told.lock().expect("told");
            told[after..].iter().filter(|t| t.2.is_ok()).count() >= 50
        };
        if recovered {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.expect("caller");
    }
    assert!(killed > 0, "no session was terminated");

    let rows = invariants::rows_by_org(&server.server.state.db).await;
    let mut by_request: HashMap<String, usize> = HashMap::new();
    for row in rows.values().flatten() {
        let name = match row.kind.as_str() {
            "storage_egress" => row.reference_id.clone(),
            "manual" if row.description != "initial" => Some(row.description.clone()),
            _ => None,
        };
        if let Some(name) = name {
            *by_request.entry(name).or_default() += 1;
        }
    }
    let told: Told = std::mem::take(&mut *told.lock().expect("told"));
    let mut unknown = 0;
    for (key, kind, result) in told.iter() {
        let applied = by_request.get(key).copied().unwrap_or(0);
        match result {
            Ok(duplicate) => {
                assert!(
                    !duplicate,
                    "{kind} {key} was sent once but answered as a duplicate"
                );
                assert_eq!(
                    applied, 1,
                    "{kind} {key} was acknowledged but applied {applied} times"
                );
            }
            Err(tonic::Code::Unavailable) => {
                unknown += 1;
                assert!(applied <= 1, "{kind} {key} applied {applied} times");
            }
            Err(code) => {
                panic!("{kind} {key}: {code:?}; a lost connection must answer UNAVAILABLE")
            }
        }
    }
    assert_eq!(
        by_request.len(),
        by_request
            .keys()
            .filter(|k| told.iter().any(|t| &t.0 == *k))
            .count(),
        "a write nobody asked for"
    );
    eprintln!(
        "{} requests, {killed} sessions terminated, {unknown} answered UNAVAILABLE",
        told.len()
    );
    invariants::check(&server.server.state.db, Utc::now()).await;
    killer.close().await.expect("close");
    server.stop().await;
}

/// A caller's deadline (`grpc-timeout`) is honoured even while the writer
/// waits on a lock held elsewhere: the call ends with DEADLINE_EXCEEDED or
/// CANCELLED instead of waiting for the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_is_honoured_while_the_writer_waits() {
    let Some(Granted {
        server,
        service,
        channel,
        ..
    }) = postgres_server_granting(&["slow"], 5 * CREDIT).await
    else {
        return;
    };
    let other = sea_orm::Database::connect(&server.db.url)
        .await
        .expect("connect");
    let txn = other.begin().await.expect("begin");
    txn.execute_unprepared("SELECT id FROM organizations WHERE external_id = 'slow' FOR UPDATE")
        .await
        .expect("lock");

    let mut usage = pb::usage_service_client::UsageServiceClient::new(channel);
    let mut request = authed(
        &service,
        pb::ConsumeRequest {
            org_id: "slow".into(),
            meter: "storage_egress".into(),
            quantity: 1,
            idempotency_key: "in-a-hurry".into(),
            ..Default::default()
        },
    );
    request.set_timeout(std::time::Duration::from_millis(300));
    let err = usage.consume(request).await.expect_err("the lock is held");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    txn.commit().await.expect("unlock");
    other.close().await.expect("close");
    server.stop().await;
}

/// Two replicas on one fresh PostgreSQL database, a channel to each, the
/// token keys and a `service` token.
struct Replicas {
    _db: TestDb,
    servers: [billing::RunningServer; 2],
    channels: [Channel; 2],
    keys: JwtKeys,
    service: String,
}

impl Replicas {
    /// `None` when PostgreSQL is not available.
    async fn start() -> Option<Self> {
        if !backends().contains(&Backend::Postgres) {
            return None;
        }
        let db = TestDb::new(Backend::Postgres).await;
        let servers = [
            start_on(&db.url, &[], Arc::new(SystemClock)).await,
            start_on(&db.url, &[], Arc::new(SystemClock)).await,
        ];
        let channels = [
            connect(servers[0].grpc_addr).await,
            connect(servers[1].grpc_addr).await,
        ];
        let keys = JwtKeys::new(JWT_SECRET.to_owned().into());
        let service = keys.issue(
            "svc",
            "internal",
            Role::Service,
            Utc::now().timestamp(),
            3600,
        );
        Some(Self {
            _db: db,
            servers,
            channels,
            keys,
            service,
        })
    }

    async fn stop(self) {
        for s in self.servers {
            s.shutdown().await.expect("shutdown");
        }
    }
}

/// Balances on PostgreSQL are served from each replica's cache. A read
/// through the replica that took a write is exact at once; a read through
/// another replica shows the write once that replica hears the writer's
/// notification, and never later than `MAX_AGE_SHARED` (the cache keeps
/// nothing longer) — measured here over 40 writes, the delay printed. In
/// between, the other replica shows the balance from just before the
/// write, never anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_reads_show_a_write_within_a_bound() {
    use std::time::{Duration, Instant};
    let Some(replicas) = Replicas::start().await else {
        return;
    };
    let [to_a, to_b] = replicas.channels.clone();
    let service = replicas.service.clone();
    let user = replicas
        .keys
        .issue("u", "stale", Role::User, Utc::now().timestamp(), 3600);
    grant(&to_a, "stale", 1000 * CREDIT).await;
    let mut usage_a = pb::usage_service_client::UsageServiceClient::new(to_a.clone());
    let mut credits_a = pb::credits_service_client::CreditsServiceClient::new(to_a);
    let mut credits_b = pb::credits_service_client::CreditsServiceClient::new(to_b);
    let bound = billing::ledger::MAX_AGE_SHARED + Duration::from_millis(500);
    let mut delays = Vec::new();
    for i in 0..40 {
        // Replica B has the balance cached.
        let before = credits_b
            .get_balance(authed(&user, pb::GetBalanceRequest {}))
            .await
            .expect("read through B")
            .into_inner()
            .balance_micros;
        let written = usage_a
            .consume(authed(
                &service,
                pb::ConsumeRequest {
                    org_id: "stale".into(),
                    meter: "storage_egress".into(),
                    quantity: 1_000_000_000,
                    idempotency_key: format!("stale-{i}"),
                    ..Default::default()
                },
            ))
            .await
            .expect("consume through A")
            .into_inner();
        let through_a = credits_a
            .get_balance(authed(&user, pb::GetBalanceRequest {}))
            .await
            .expect("read through A")
            .into_inner();
        assert_eq!(
            through_a.balance_micros, written.balance_micros,
            "the writing replica's read is exact at once"
        );
        let started = Instant::now();
        loop {
            let seen = credits_b
                .get_balance(authed(&user, pb::GetBalanceRequest {}))
                .await
                .expect("read through B")
                .into_inner()
                .balance_micros;
            if seen == written.balance_micros {
                break;
            }
            assert_eq!(seen, before, "B showed neither the old nor the new balance");
            assert!(
                started.elapsed() < bound,
                "B still showed the balance from before the write after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    println!(
        "another replica showed a write after: median {:?}, max {:?} (bound {:?})",
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        billing::ledger::MAX_AGE_SHARED
    );
    replicas.stop().await;
}

/// A writer queue that is full refuses at once with RESOURCE_EXHAUSTED
/// instead of letting callers wait without bound. The writer is held up on
/// a lock taken elsewhere, the queue (4 deep here) fills, every further
/// write is refused; once the lock goes, every accepted write completes,
/// and exactly the accepted ones were charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_writer_queue_sheds_writes() {
    use sea_orm::{ColumnTrait, QueryFilter};
    use std::time::{Duration, Instant};
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let server = start_on(
        &db.url,
        &[("LEDGER_QUEUE_DEPTH", "4")],
        Arc::new(SystemClock),
    )
    .await;
    let channel = connect(server.grpc_addr).await;
    let keys = JwtKeys::new(JWT_SECRET.to_owned().into());
    let now = Utc::now().timestamp();
    let service = keys.issue("svc", "internal", Role::Service, now, 3600);
    grant(&channel, "full", 100 * CREDIT).await;
    let other = sea_orm::Database::connect(&db.url).await.expect("connect");
    let txn = other.begin().await.expect("begin");
    txn.execute_unprepared("SELECT id FROM organizations WHERE external_id = 'full' FOR UPDATE")
        .await
        .expect("lock");

    const CALLS: usize = 40;
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
        let (service, refused) = (service.clone(), refused.clone());
        calls.push(tokio::spawn(async move {
            let answer = usage
                .consume(authed(
                    &service,
                    pb::ConsumeRequest {
                        org_id: "full".into(),
                        meter: "storage_egress".into(),
                        quantity: 1_000_000_000,
                        idempotency_key: format!("shed-{i}"),
                        ..Default::default()
                    },
                ))
                .await;
            if let Err(e) = &answer {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert_eq!(reason(e), "RESOURCE_EXHAUSTED");
                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            answer.map(|r| r.into_inner().charged_micros)
        }));
    }
    // At most one batch (the first job and what had queued behind it, up
    // to the depth) is held up inside the database, plus a full queue:
    // every other call must be refused while the lock is held.
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused.load(std::sync::atomic::Ordering::SeqCst) < CALLS - 2 * 4 - 1 {
        assert!(Instant::now() < deadline, "the full queue did not shed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    txn.commit().await.expect("unlock");
    let mut charged = 0;
    let mut accepted = 0;
    for call in calls {
        if let Ok(micros) = call.await.expect("task") {
            charged += micros;
            accepted += 1;
        }
    }
    assert!(accepted >= 1, "the writer took nothing");
    assert_eq!(
        accepted + refused.load(std::sync::atomic::Ordering::SeqCst),
        CALLS
    );
    let org = organization::Entity::find()
        .filter(organization::Column::ExternalId.eq("full"))
        .one(&server.state.db)
        .await
        .expect("org")
        .expect("exists");
    assert_eq!(org.balance_micros, 100 * CREDIT - charged);
    invariants::check(&server.state.db, Utc::now()).await;
    other.close().await.expect("close");
    server.shutdown().await.expect("stop");
}

/// On PostgreSQL a batch of `Consume`s may start from the state its
/// writer's last batch left and write in one checked statement (no load,
/// no lock). Anything anyone else did meanwhile sends it back to the
/// locking path, and the answer is the one a locked batch gives: a grant
/// made through another replica is spent from, a replayed key answers its
/// first charge, a refusal is decided again under the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_batches_give_way_to_anything_written_meanwhile() {
    use std::sync::atomic::Ordering::SeqCst;
    let Some(replicas) = Replicas::start().await else {
        return;
    };
    let [to_a, to_b] = replicas.channels.clone();
    let (a, service) = (&replicas.servers[0], replicas.service.clone());
    let usage = pb::usage_service_client::UsageServiceClient::new(to_a.clone());
    let consume = |key: &str, gigabytes: i64| {
        let request = authed(
            &service,
            pb::ConsumeRequest {
                org_id: "warm".into(),
                meter: "storage_egress".into(),
                quantity: gigabytes * 1_000_000_000,
                idempotency_key: key.into(),
                ..Default::default()
            },
        );
        let mut usage = usage.clone();
        async move { usage.consume(request).await }
    };
    let counts = a.state.ledger.batch_counts();

    let mut balance = grant(&to_a, "warm", 10 * CREDIT).await;
    let first = consume("k1", 1).await.expect("k1").into_inner();
    let cost = first.charged_micros;
    assert!(cost > 0);
    balance -= cost;
    assert_eq!(first.balance_micros, balance);
    let warm_before = counts.warm.load(SeqCst);
    let second = consume("k2", 1).await.expect("k2").into_inner();
    balance -= cost;
    assert_eq!(second.balance_micros, balance);
    assert_eq!(counts.warm.load(SeqCst), warm_before + 1, "k2 ran warm");

    // Another replica grants: the warm state is stale.
    balance = grant(&to_b, "warm", 5 * CREDIT).await;
    let fallbacks = counts.warm_fallbacks.load(SeqCst);
    let third = consume("k3", 1).await.expect("k3").into_inner();
    balance -= cost;
    assert_eq!(third.balance_micros, balance, "the grant was seen");
    assert_eq!(counts.warm_fallbacks.load(SeqCst), fallbacks + 1);

    // A replay: the key is stored, the warm write fails on it.
    let replay = consume("k3", 1).await.expect("replay").into_inner();
    assert!(replay.duplicate);
    assert_eq!(replay.transaction_id, third.transaction_id);
    assert_eq!(counts.warm_fallbacks.load(SeqCst), fallbacks + 2);

    // A refusal is decided under the lock.
    let too_much = balance / cost + 1;
    let err = consume("k4", too_much).await.expect_err("too much");
    assert_eq!(reason(&err), "INSUFFICIENT_CREDITS");
    let last = consume("k5", 1).await.expect("k5").into_inner();
    balance -= cost;
    assert_eq!(last.balance_micros, balance);

    invariants::check(&a.state.db, Utc::now()).await;
    replicas.stop().await;
}

/// One batch holding a warm organization's `Consume`s and another
/// organization's hold: the `Consume`s are still written warm, in a part of
/// the batch of their own, and the hold takes the locking path beside them.
/// Every answer is the one each operation would get on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_in_the_batch_does_not_send_warm_consumes_to_the_lock() {
    use billing::{
        domain::Meter,
        ledger::{ConsumeInput, HoldAmount, Op, Outcome, ReserveInput},
    };
    use std::sync::atomic::Ordering::SeqCst;
    let Some(replicas) = Replicas::start().await else {
        return;
    };
    let to_a = replicas.channels[0].clone();
    let a = &replicas.servers[0];
    let ledger = &a.state.ledger;
    let counts = ledger.batch_counts();
    let consume = |key: &str| {
        Op::Consume(ConsumeInput {
            org: "split-warm".into(),
            meter: Meter::AiTokens,
            quantity: 1_000,
            model: None,
            key: key.into(),
            description: None,
        })
    };

    let mut balance = grant(&to_a, "split-warm", 10 * CREDIT).await;
    let held_balance = grant(&to_a, "split-held", 10 * CREDIT).await;
    // The first Consume loads the organization; from then on it is warm.
    let first = ledger
        .submit_together(vec![consume("s1")])
        .await
        .expect("s1");
    let Ok(Outcome::Consume(first)) = &first[0] else {
        panic!("s1: {first:?}");
    };
    let cost = first.charged_micros;
    assert!(cost > 0);
    balance -= cost;
    assert_eq!(first.balance_micros, balance);

    let (warm, locked) = (counts.warm.load(SeqCst), counts.locked.load(SeqCst));
    let results = ledger
        .submit_together(vec![
            consume("s2"),
            Op::Reserve(ReserveInput {
                org: "split-held".into(),
                amount: HoldAmount::Micros(3 * CREDIT),
                ttl_seconds: 600,
                key: "h1".into(),
            }),
            consume("s3"),
        ])
        .await
        .expect("batch");
    assert_eq!(counts.warm.load(SeqCst), warm + 1, "the Consumes ran warm");
    assert_eq!(
        counts.locked.load(SeqCst),
        locked + 1,
        "the hold ran locked"
    );
    let [
        Ok(Outcome::Consume(s2)),
        Ok(Outcome::Reserve(h1)),
        Ok(Outcome::Consume(s3)),
    ] = &results[..]
    else {
        panic!("answers: {results:?}");
    };
    assert_eq!(s2.balance_micros, balance - cost);
    assert_eq!(s3.balance_micros, balance - 2 * cost);
    assert!(!s2.duplicate && !s3.duplicate);
    assert_eq!(h1.held_micros, 3 * CREDIT);
    assert_eq!(held_balance, 10 * CREDIT);

    invariants::check(&a.state.db, Utc::now()).await;
    replicas.stop().await;
}

/// Consume-only load on two replicas of one PostgreSQL, the pattern the
/// warm path serves: 32 callers over two organizations, a third of the keys
/// shared so replicas race on them. Both replicas run batches warm, and
/// fall back when the other one wrote; afterwards every key was charged
/// exactly once, every answer to a key names the same transaction, and the
/// balances are exactly the grants less what callers were told.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_batches_race_across_replicas_without_losing_a_credit() {
    use std::sync::atomic::Ordering::SeqCst;
    const WARM_ORGS: [&str; 2] = ["hot-a", "hot-b"];
    let Some(replicas) = Replicas::start().await else {
        return;
    };
    let (servers, channels) = (&replicas.servers, &replicas.channels);
    let service = replicas.service.clone();
    for org in WARM_ORGS {
        grant(&channels[0], org, INITIAL).await;
    }
    /// Per key: organization, transaction id, charged, answers not marked
    /// duplicate.
    type Told = HashMap<String, (String, String, i64, u32)>;
    let told: Arc<Mutex<Told>> = Arc::default();
    let mut tasks = Vec::new();
    for id in 0..32usize {
        let mut usage = pb::usage_service_client::UsageServiceClient::new(
            channels[id % channels.len()].clone(),
        );
        let (service, told) = (service.clone(), told.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(1000 + id as u64);
            for n in 0..30 {
                let org = WARM_ORGS[rng.random_range(0..WARM_ORGS.len())];
                let key = if rng.random_bool(0.3) {
                    format!("{org}-shared-{}", rng.random_range(0..20))
                } else {
                    format!("{org}-{id}-{n}")
                };
                let request = pb::ConsumeRequest {
                    org_id: org.into(),
                    meter: "storage_egress".into(),
                    quantity: 100_000_000,
                    idempotency_key: key.clone(),
                    ..Default::default()
                };
                match usage.consume(authed(&service, request)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let mut told = told.lock().expect("told");
                        let entry = told.entry(key).or_insert_with(|| {
                            (
                                org.to_owned(),
                                r.transaction_id.clone(),
                                r.charged_micros,
                                0,
                            )
                        });
                        assert_eq!(
                            entry.1, r.transaction_id,
                            "a replay answered another charge"
                        );
                        if !r.duplicate {
                            entry.3 += 1;
                        }
                    }
                    Err(e) => assert_eq!(reason(&e), "INSUFFICIENT_CREDITS", "{e:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("caller");
    }
    let conn = &servers[0].state.db;
    invariants::check(conn, Utc::now()).await;
    let told = std::mem::take(&mut *told.lock().expect("told"));
    let rows = invariants::rows_by_org(conn).await;
    for org in WARM_ORGS {
        let charged: i64 = told
            .values()
            .filter(|(o, ..)| o == org)
            .map(|(_, _, charged, _)| charged)
            .sum();
        let usage: Vec<_> = rows[org]
            .iter()
            .filter(|r| r.kind == "storage_egress")
            .collect();
        assert_eq!(
            usage.len(),
            told.values().filter(|(o, ..)| o == org).count(),
            "{org}: one charge per key"
        );
        let o = organization::Entity::find()
            .all(conn)
            .await
            .expect("orgs")
            .into_iter()
            .find(|o| o.external_id == org)
            .expect("org");
        assert_eq!(o.balance_micros, INITIAL - charged, "{org}: balance");
    }
    for (key, (_, _, _, firsts)) in &told {
        assert_eq!(
            *firsts, 1,
            "{key} was answered as a first charge {firsts} times"
        );
    }
    let warm: u64 = servers
        .iter()
        .map(|s| s.state.ledger.batch_counts().warm.load(SeqCst))
        .sum();
    let fallbacks: u64 = servers
        .iter()
        .map(|s| s.state.ledger.batch_counts().warm_fallbacks.load(SeqCst))
        .sum();
    eprintln!("warm batches {warm}, fallbacks {fallbacks}");
    assert!(warm > 0, "no batch ran warm");
    assert!(fallbacks > 0, "no warm batch met another replica's write");
    replicas.stop().await;
}

/// During a failover a pooler can hand the service a connection to a node
/// that is not (yet) the primary. Here the database turns read-only for new
/// sessions and every session is cut: writes must answer UNAVAILABLE, not
/// INTERNAL, and nothing may be written; once the database takes writes
/// again, the service does too, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_answers_unavailable_until_it_takes_writes() {
    let Some(g) = postgres_server_granting(&["org-ro"], 10 * CREDIT).await else {
        return;
    };
    // The cluster's maintenance database: the test database's settings do
    // not apply to it.
    let admin_db = sea_orm::Database::connect(std::env::var("TEST_DATABASE_URL").expect("url"))
        .await
        .expect("connect");
    let name = g.server.db.name.clone().expect("a PostgreSQL database");
    // New sessions read-only (or not), and every session of the database
    // cut, so the service's next ones get the new setting.
    let switch = |read_only: bool| {
        let (admin_db, name) = (&admin_db, &name);
        async move {
            admin_db
                .execute_unprepared(&format!(
                    "ALTER DATABASE \"{name}\" SET default_transaction_read_only = {read_only}"
                ))
                .await
                .expect("alter database");
            admin_db
                .execute_unprepared(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                ))
                .await
                .expect("cut sessions");
        }
    };
    switch(true).await;

    let mut usage = pb::usage_service_client::UsageServiceClient::new(g.channel.clone());
    let consume = |key: &str| {
        authed(
            &g.service,
            pb::ConsumeRequest {
                org_id: "org-ro".into(),
                meter: "storage_egress".into(),
                quantity: 1_000_000_000,
                idempotency_key: key.into(),
                ..Default::default()
            },
        )
    };
    for n in 0..5 {
        let refused = usage
            .consume(consume(&format!("ro-{n}")))
            .await
            .expect_err("a read-only database takes no write");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    }

    // The node is promoted: it takes writes again (new sessions), and the
    // service's sessions to it are renewed.
    switch(false).await;
    let start = std::time::Instant::now();
    let answer = loop {
        match usage.consume(consume("ro-after")).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && start.elapsed().as_secs() < 30 => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(s) => panic!("after the database took writes again: {s:?}"),
        }
    };
    assert!(!answer.duplicate);
    let db = sea_orm::Database::connect(&g.server.db.url)
        .await
        .expect("connect");
    let rows = billing::entities::ledger_transaction::Entity::find()
        .all(&db)
        .await
        .expect("ledger");
    // The grant and the one charge that went through; none of the refused.
    assert_eq!(rows.len(), 2, "{rows:?}");
    invariants::check(&db, Utc::now()).await;
}
