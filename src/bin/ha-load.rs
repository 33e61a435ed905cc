//! `ha-load`: mixed ledger load against running `billing serve` replicas,
//! then a proof that nothing was lost or doubled. `scripts/ha-test` runs it
//! while it kills the PostgreSQL primary under the replicas.
//!
//! Load: workers call, round robin over `--targets`, a mix of `Consume`
//! (idempotency key), grants (`ManualAdjust` with a key), and holds
//! (`Reserve` with a key, then `Commit` or `Release`). Every call's outcome
//! is kept: *acknowledged* (an answer), *refused* (a definite error such as
//! INVALID_ARGUMENT: no effect), or *unknown* (UNAVAILABLE, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED, a transport error: it may or may not have run).
//!
//! Check, once the load ends (every call retried until the cluster answers):
//! - every acknowledged call replays as itself: the same key gives the same
//!   transaction or hold, a finished hold says it was committed with the
//!   charge first answered;
//! - every unknown call is sent again: its answer says whether it had taken
//!   effect (a duplicate) or takes effect now, once;
//! - every hold left open is released;
//! - then each organization's stored balance is exactly the seed grant plus
//!   its grants less its charges, as counted from the answers.
//!
//! Also measured: calls that failed with each status code, and how long
//! after the kill (the unix-millisecond time in `--kill-marker`, written by
//! the script) the first call started after it was answered.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use billing::{auth::JwtKeys, auth::Role, pb};
use clap::Parser;
use rand::Rng;
use secrecy::SecretString;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

#[derive(Parser, Debug)]
struct Args {
    /// gRPC addresses of the replicas, comma separated.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// The replicas' BILLING_JWT_SECRET.
    #[arg(long, env = "BILLING_JWT_SECRET")]
    jwt_secret: String,
    #[arg(long, default_value_t = 4)]
    orgs: usize,
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// A file the script writes the kill's unix-millisecond time into.
    #[arg(long)]
    kill_marker: Option<String>,
    /// Seconds a single call may take before it counts as unknown.
    #[arg(long, default_value_t = 3)]
    call_timeout: u64,
}

const CREDIT: i64 = 1_000_000;
const SEED: i64 = 1_000_000 * CREDIT;

/// What one call of the load was.
#[derive(Debug, Clone)]
enum Op {
    Consume {
        org: String,
        key: String,
        tokens: i64,
    },
    Grant {
        org: String,
        key: String,
        amount: i64,
    },
    Reserve {
        org: String,
        key: String,
        amount: i64,
    },
    Commit {
        org: String,
        hold: String,
        tokens: i64,
    },
    Release {
        org: String,
        hold: String,
    },
}

/// What an answer said.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// The transaction (or hold) id and the credits it moved.
    Done { id: String, micros: i64 },
    /// The hold was already finished: how, by which transaction, what it
    /// charged (RESERVATION_FINISHED and its metadata).
    Finished {
        status: String,
        transaction_id: String,
        charged: i64,
    },
}

/// How a call ended.
#[derive(Debug, Clone)]
enum Outcome {
    Acked(Answer),
    Refused(Code),
    Unknown(Code),
}

struct Record {
    op: Op,
    outcome: Outcome,
    started_ms: u64,
    ended_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a failed call may still have taken effect.
fn unknown(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::Cancelled
    )
}

struct Clients {
    usage: pb::usage_service_client::UsageServiceClient<Channel>,
    admin: pb::admin_service_client::AdminServiceClient<Channel>,
    credits: pb::credits_service_client::CreditsServiceClient<Channel>,
}

struct Tokens {
    service: String,
    admin: String,
    keys: JwtKeys,
}

impl Tokens {
    fn user(&self, org: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        self.keys.issue("ha-load", org, Role::User, now, 3600)
    }
}

fn authed<T>(token: &str, message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn grant_request(org: &str, key: &str, amount: i64) -> pb::ManualAdjustRequest {
    pb::ManualAdjustRequest {
        org_id: org.to_owned(),
        amount_micros: amount,
        reason: "ha-load".into(),
        expires_at: None,
        idempotency_key: Some(key.to_owned()),
    }
}

fn consume_request(org: &str, key: &str, tokens: i64) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        org_id: org.to_owned(),
        meter: "ai_tokens".into(),
        quantity: tokens,
        model: None,
        idempotency_key: key.to_owned(),
        description: None,
    }
}

fn reserve_request(org: &str, key: &str, amount: i64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        org_id: org.to_owned(),
        amount_micros: Some(amount),
        meter: None,
        quantity: None,
        model: None,
        ttl_seconds: Some(3600),
        idempotency_key: key.to_owned(),
    }
}

fn commit_request(hold: &str, tokens: i64) -> pb::CommitRequest {
    pb::CommitRequest {
        reservation_id: hold.to_owned(),
        meter: "ai_tokens".into(),
        quantity: tokens,
        model: None,
        description: None,
    }
}

/// One call, its outcome classified.
async fn call(c: &mut Clients, t: &Tokens, op: &Op, timeout: Duration) -> Outcome {
    let answer: Result<(String, i64), Status> = match op {
        Op::Consume { org, key, tokens } => c
            .usage
            .consume(authed(
                &t.service,
                consume_request(org, key, *tokens),
                timeout,
            ))
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.transaction_id, r.charged_micros)
            }),
        Op::Grant { org, key, amount } => c
            .admin
            .manual_adjust(authed(&t.admin, grant_request(org, key, *amount), timeout))
            .await
            .map(|r| (r.into_inner().transaction_id, *amount)),
        Op::Reserve { org, key, amount } => c
            .usage
            .reserve(authed(
                &t.service,
                reserve_request(org, key, *amount),
                timeout,
            ))
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.reservation_id, r.held_micros)
            }),
        Op::Commit { hold, tokens, .. } => c
            .usage
            .commit(authed(&t.service, commit_request(hold, *tokens), timeout))
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.transaction_id, r.charged_micros)
            }),
        Op::Release { hold, .. } => c
            .usage
            .release(authed(
                &t.service,
                pb::ReleaseRequest {
                    reservation_id: hold.clone(),
                },
                timeout,
            ))
            .await
            .map(|r| (hold.clone(), r.into_inner().released_micros)),
    };
    match answer {
        Ok((id, micros)) => Outcome::Acked(Answer::Done { id, micros }),
        Err(s) if unknown(s.code()) => Outcome::Unknown(s.code()),
        Err(s) => {
            // A finished hold answers how it finished: for a Commit sent
            // again, "committed" is its own earlier success.
            if let (Op::Commit { .. } | Op::Release { .. }, Some(info)) =
                (op, s.get_details_error_info())
                && info.reason == "RESERVATION_FINISHED"
            {
                let text = |key: &str| info.metadata.get(key).cloned().unwrap_or_default();
                return Outcome::Acked(Answer::Finished {
                    status: text("status"),
                    transaction_id: text("transaction_id"),
                    charged: text("charged_micros").parse().unwrap_or(0),
                });
            }
            Outcome::Refused(s.code())
        }
    }
}

/// A definite answer.
#[derive(Debug)]
enum Settled {
    Acked(Answer),
    Refused(Code),
}

/// Calls `op` until it answers definitely (for two minutes at most).
async fn settle(c: &mut Clients, t: &Tokens, op: &Op) -> anyhow::Result<Settled> {
    let start = Instant::now();
    loop {
        match call(c, t, op, Duration::from_secs(10)).await {
            Outcome::Acked(answer) => return Ok(Settled::Acked(answer)),
            Outcome::Refused(code) => return Ok(Settled::Refused(code)),
            Outcome::Unknown(code) if start.elapsed() > Duration::from_secs(120) => {
                bail!("{op:?} still answers {code:?} after 120 s")
            }
            Outcome::Unknown(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn clients(url: &str) -> anyhow::Result<Clients> {
    let channel = Channel::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    Ok(Clients {
        usage: pb::usage_service_client::UsageServiceClient::new(channel.clone()),
        admin: pb::admin_service_client::AdminServiceClient::new(channel.clone()),
        credits: pb::credits_service_client::CreditsServiceClient::new(channel),
    })
}

/// What the workers share.
struct Load {
    tokens: Tokens,
    orgs: Vec<String>,
    deadline: Instant,
    timeout: Duration,
    log: Mutex<Vec<Record>>,
    seq: AtomicU64,
}

/// One worker's calls until the deadline.
async fn work(mut c: Clients, load: Arc<Load>, worker: usize) {
    let (t, orgs, timeout, log) = (&load.tokens, &load.orgs, load.timeout, &load.log);
    while Instant::now() < load.deadline {
        let n = load.seq.fetch_add(1, Ordering::Relaxed);
        let (org, pick, tokens, amount) = {
            let mut rng = rand::rng();
            (
                orgs[rng.random_range(0..orgs.len())].clone(),
                rng.random_range(0..100),
                rng.random_range(1_000..200_000_i64),
                rng.random_range(1..50_i64) * CREDIT,
            )
        };
        let key = format!("ha-{worker}-{n}");
        let first = match pick {
            0..60 => Op::Consume {
                org: org.clone(),
                key,
                tokens,
            },
            60..75 => Op::Grant {
                org: org.clone(),
                key,
                amount,
            },
            _ => Op::Reserve {
                org: org.clone(),
                key,
                amount,
            },
        };
        let started_ms = now_ms();
        let outcome = call(&mut c, t, &first, timeout).await;
        let hold = match (&first, &outcome) {
            (Op::Reserve { .. }, Outcome::Acked(Answer::Done { id, .. })) => Some(id.clone()),
            _ => None,
        };
        push(log, first, outcome, started_ms);
        if let Some(hold) = hold {
            let second = if pick < 90 {
                Op::Commit { org, hold, tokens }
            } else {
                Op::Release { org, hold }
            };
            let started_ms = now_ms();
            let outcome = call(&mut c, t, &second, timeout).await;
            push(log, second, outcome, started_ms);
        }
    }
}

fn push(log: &Mutex<Vec<Record>>, op: Op, outcome: Outcome, started_ms: u64) {
    let record = Record {
        op,
        outcome,
        started_ms,
        ended_ms: now_ms(),
    };
    if let Ok(mut log) = log.lock() {
        log.push(record);
    }
}

fn org_of(op: &Op) -> &str {
    match op {
        Op::Consume { org, .. }
        | Op::Grant { org, .. }
        | Op::Reserve { org, .. }
        | Op::Commit { org, .. }
        | Op::Release { org, .. } => org,
    }
}

/// Stored credits an acknowledged `op` moved (holds move none; a Commit
/// that finds its hold committed moved what that commit charged).
fn stored_effect(op: &Op, answer: &Answer) -> i64 {
    let micros = match answer {
        Answer::Done { micros, .. } => *micros,
        Answer::Finished { charged, .. } => *charged,
    };
    match op {
        Op::Consume { .. } | Op::Commit { .. } => -micros,
        Op::Grant { .. } => micros,
        Op::Reserve { .. } | Op::Release { .. } => 0,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing::install_tls_provider();
    let args = Args::parse();
    if args.targets.is_empty() {
        bail!("--targets: give at least one gRPC address");
    }
    let keys = JwtKeys::new(SecretString::from(args.jwt_secret.clone()));
    let now = chrono::Utc::now().timestamp();
    let tokens = Tokens {
        service: keys.issue("ha-load", "internal", Role::Service, now, 7200),
        admin: keys.issue("ha-load", "ops", Role::Admin, now, 7200),
        keys,
    };
    let run = now_ms();
    let orgs: Vec<String> = (0..args.orgs).map(|i| format!("ha-{run}-{i}")).collect();

    // Seed: a large grant per organization, settled before the load.
    let mut seed_clients = clients(&args.targets[0]).await?;
    for org in orgs.iter() {
        let op = Op::Grant {
            org: org.clone(),
            key: "seed".into(),
            amount: SEED,
        };
        if let Settled::Refused(code) = settle(&mut seed_clients, &tokens, &op).await? {
            bail!("seeding {org}: {code:?}");
        }
    }

    let load = Arc::new(Load {
        tokens,
        orgs,
        deadline: Instant::now() + Duration::from_secs(args.seconds),
        timeout: Duration::from_secs(args.call_timeout),
        log: Mutex::new(Vec::new()),
        seq: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for worker in 0..args.workers {
        let url = &args.targets[worker % args.targets.len()];
        tasks.push(tokio::spawn(work(
            clients(url).await?,
            load.clone(),
            worker,
        )));
    }
    for task in tasks {
        task.await?;
    }
    let records = std::mem::take(
        &mut *load
            .log
            .lock()
            .map_err(|_| anyhow::anyhow!("log poisoned"))?,
    );
    let (tokens, orgs) = (&load.tokens, &load.orgs);

    // Figures of the load.
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let (mut acked, mut refused, mut unknown_count) = (0, 0, 0);
    for r in &records {
        match &r.outcome {
            Outcome::Acked(_) => acked += 1,
            Outcome::Refused(code) => {
                refused += 1;
                *by_code.entry(format!("{code:?}")).or_default() += 1;
            }
            Outcome::Unknown(code) => {
                unknown_count += 1;
                *by_code.entry(format!("{code:?}")).or_default() += 1;
            }
        }
    }
    println!(
        "ha-load: {} calls in {} s: {acked} answered, {unknown_count} unknown, {refused} refused; failures by code: {by_code:?}",
        records.len(),
        args.seconds
    );
    let mut failed = false;
    if let Some(path) = &args.kill_marker {
        let killed: u64 = std::fs::read_to_string(path)
            .with_context(|| format!("--kill-marker {path}"))?
            .trim()
            .parse()
            .context("--kill-marker: unix milliseconds")?;
        // The kill takes a moment to bite: calls started just after the
        // marker may still be answered by the dying primary. The outage
        // starts with the first failure after the kill, and ends with the
        // first answer to a call started after that failure.
        let first_failure = records
            .iter()
            .filter(|r| r.ended_ms >= killed && !matches!(r.outcome, Outcome::Acked(_)))
            .map(|r| r.ended_ms)
            .min()
            .unwrap_or(killed);
        let back = records
            .iter()
            .filter(|r| r.started_ms >= first_failure && matches!(r.outcome, Outcome::Acked(_)))
            .map(|r| r.ended_ms)
            .min();
        let failed_after = records
            .iter()
            .filter(|r| r.ended_ms >= killed && !matches!(r.outcome, Outcome::Acked(_)))
            .count();
        // Answers per second around the kill, by when each call ended.
        let mut seconds: BTreeMap<i64, (usize, usize)> = BTreeMap::new();
        for r in &records {
            let at = (r.ended_ms as i64 - killed as i64).div_euclid(1000);
            if (-1..=20).contains(&at) {
                let slot = seconds.entry(at).or_default();
                match r.outcome {
                    Outcome::Acked(_) => slot.0 += 1,
                    Outcome::Refused(_) | Outcome::Unknown(_) => slot.1 += 1,
                }
            }
        }
        let timeline: Vec<String> = seconds
            .iter()
            .map(|(s, (ok, bad))| format!("{s:+}s {ok}/{bad}"))
            .collect();
        println!(
            "ha-load: answered/failed per second from the kill on: {}",
            timeline.join(", ")
        );
        match back {
            Some(t) => println!(
                "ha-load: first failure {:.1} s after the primary was killed, answered again {:.1} s after it ({failed_after} calls failed in between)",
                (first_failure - killed) as f64 / 1000.0,
                (t - killed) as f64 / 1000.0
            ),
            None => {
                println!("ha-load: FAIL: no call answered after the primary was killed");
                failed = true;
            }
        }
    }
    for code in ["Internal", "Unknown"] {
        if let Some(n) = by_code.get(code) {
            println!(
                "ha-load: FAIL: {n} calls answered {code} (a database outage must be UNAVAILABLE)"
            );
            failed = true;
        }
    }

    // Check: replay everything, settle the unknown, release open holds.
    let mut c = clients(&args.targets[0]).await?;
    let mut expected: BTreeMap<String, i64> = orgs.iter().map(|o| (o.clone(), SEED)).collect();
    let mut open_holds: Vec<(String, String)> = Vec::new();
    let mut finished_holds: HashSet<String> = HashSet::new();
    let (mut replayed, mut settled_unknown) = (0, 0);
    for r in &records {
        let again = settle(&mut c, tokens, &r.op).await?;
        match (&r.outcome, &again) {
            (Outcome::Acked(first), Settled::Acked(replay)) => {
                let same = match (&r.op, first, replay) {
                    // A Commit sent again answers that the hold was
                    // committed, by its transaction, with its charge.
                    (
                        Op::Commit { .. },
                        Answer::Done { id, micros },
                        Answer::Finished {
                            status,
                            transaction_id,
                            charged,
                        },
                    ) => status == "committed" && transaction_id == id && charged == micros,
                    (Op::Release { .. }, Answer::Done { .. }, Answer::Finished { status, .. }) => {
                        status == "released"
                    }
                    (Op::Consume { .. } | Op::Grant { .. } | Op::Reserve { .. }, _, _) => {
                        replay == first
                    }
                    (Op::Commit { .. } | Op::Release { .. }, _, _) => false,
                };
                if !same {
                    println!(
                        "ha-load: FAIL: {:?} answered {first:?}, its replay {replay:?}",
                        r.op
                    );
                    failed = true;
                }
                replayed += 1;
                *expected.entry(org_of(&r.op).to_owned()).or_default() +=
                    stored_effect(&r.op, first);
            }
            (Outcome::Unknown(_), Settled::Acked(answer)) => {
                settled_unknown += 1;
                *expected.entry(org_of(&r.op).to_owned()).or_default() +=
                    stored_effect(&r.op, answer);
            }
            (Outcome::Refused(_), _) | (Outcome::Unknown(_), Settled::Refused(_)) => {}
            (Outcome::Acked(_), Settled::Refused(code)) => {
                println!(
                    "ha-load: FAIL: {:?} was answered, its replay refused with {code:?}",
                    r.op
                );
                failed = true;
            }
        }
        match (&r.op, &again) {
            (Op::Reserve { org, .. }, Settled::Acked(Answer::Done { id, .. })) => {
                open_holds.push((org.clone(), id.clone()))
            }
            (Op::Commit { hold, .. } | Op::Release { hold, .. }, Settled::Acked(_)) => {
                finished_holds.insert(hold.clone());
            }
            _ => {}
        }
    }
    // Holds whose Reserve took effect but that were never finished.
    let mut released = 0;
    for (org, hold) in &open_holds {
        if finished_holds.contains(hold) {
            continue;
        }
        let op = Op::Release {
            org: org.clone(),
            hold: hold.clone(),
        };
        settle(&mut c, tokens, &op).await?;
        released += 1;
    }
    println!(
        "ha-load: {replayed} answered calls replayed as themselves, {settled_unknown} unknown ones settled, {released} open holds released"
    );

    for org in orgs.iter() {
        let want = expected.get(org).copied().unwrap_or(0);
        // Another replica's last writes reach this one's balance cache
        // within a second; give it five.
        let asked = Instant::now();
        let b = loop {
            let b = c
                .credits
                .get_balance(authed(
                    &tokens.user(org),
                    pb::GetBalanceRequest {},
                    Duration::from_secs(10),
                ))
                .await
                .with_context(|| format!("balance of {org}"))?
                .into_inner();
            if (b.stored_micros == want && b.balance_micros == want)
                || asked.elapsed() > Duration::from_secs(5)
            {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if b.stored_micros != want || b.balance_micros != want {
            println!(
                "ha-load: FAIL: {org} holds {} stored, {} spendable; its answers add up to {want}",
                b.stored_micros, b.balance_micros
            );
            failed = true;
        } else {
            println!("ha-load: {org}: {want} micro-credits, as its answers add up to");
        }
    }
    if failed {
        bail!("credits went astray (see FAIL above)");
    }
    println!("ha-load: passed");
    Ok(())
}
