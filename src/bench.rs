//! `billing bench`: load over real gRPC, with figures anyone can rerun.
//!
//! Starts the service in-process on `127.0.0.1:0` (or targets a running
//! one), gives each benchmark organization plenty of credits, then drives
//! each chosen workload from N concurrent callers over M organizations for
//! T seconds and prints throughput and latency percentiles. The callers
//! share `--connections` HTTP/2 connections (default: one each); a list of
//! connection counts runs every workload once per count, which is how
//! callers really call (a tonic `Channel` multiplexes every call on one
//! connection).
//!
//! On PostgreSQL it runs pgbench's built-in TPC-B script against a
//! scratch database of the same server, initialised at a scale of at least
//! the caller count (pgbench's documentation asks for it: at scale 1 every
//! transaction updates the one branch row and pgbench measures lock
//! contention), just before each `Consume` run, so each ratio compares two
//! measurements seconds apart. At the end it prints the ratios the README
//! reports:
//! `Consume` / pgbench, `GetBalance` / health check and `CheckAllowance` /
//! health check, each for every connection count.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sea_orm::{ConnectionTrait, Database};
use secrecy::SecretString;
use tonic::{Request, transport::Channel};

use crate::{
    Config, Listeners, ServerOptions,
    auth::{JwtKeys, Role},
    pb,
};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// `UsageService.Consume`, unique idempotency keys.
    Consume,
    /// Holds beside `Consume`s: on the odd organizations a call is a hold
    /// (`UsageService.Reserve`, then `Commit` of it, counted as one call),
    /// on the even ones a `Consume`.
    Mixed,
    /// `UsageService.CheckAllowance`.
    Allowance,
    /// `CreditsService.GetBalance`.
    Balance,
    /// `grpc.health.v1.Health/Check`: the floor a read is compared with.
    Health,
}

impl Workload {
    fn method(self) -> &'static str {
        match self {
            Self::Consume => "Consume",
            Self::Mixed => "Mixed",
            Self::Allowance => "CheckAllowance",
            Self::Balance => "GetBalance",
            Self::Health => "Health/Check",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Workloads to run, in order (default: consume, allowance, balance,
    /// health).
    #[arg(value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// HTTP/2 connections the callers share, round robin; a comma list runs
    /// every workload once per count (default: one connection per caller).
    #[arg(long, value_delimiter = ',')]
    pub connections: Vec<usize>,
    /// Organizations the load is spread over.
    #[arg(long, default_value_t = 8)]
    pub orgs: usize,
    /// Seconds of measured load per run (after 2 s of warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Database of the in-process server (default: a fresh SQLite file).
    /// Use a scratch database: the benchmark writes to it.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Running servers to load instead (http://host:port, comma-separated
    /// for several replicas: connection i goes to server i mod n); needs
    /// `BILLING_JWT_SECRET` to match theirs.
    #[arg(long)]
    pub target: Option<String>,
    /// Skip the pgbench comparison on PostgreSQL.
    #[arg(long)]
    pub no_pgbench: bool,
    /// pgbench's scale factor (default and minimum: the caller count).
    #[arg(long)]
    pub pgbench_scale: Option<usize>,
    /// Also print each run second by second: calls (or pgbench's
    /// transactions), how busy the machine's CPUs were, this process's
    /// share of that, and the time the host stole.
    #[arg(long)]
    pub timeline: bool,
}

struct Figures {
    calls: usize,
    errors: usize,
    seconds: f64,
    latencies_us: Vec<u32>,
    /// The measured seconds, one by one.
    timeline: Vec<Second>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// One workload at one connection count.
struct Run {
    workload: Workload,
    connections: usize,
    figures: Figures,
    /// pgbench's tps, measured just before (Consume on PostgreSQL).
    pgbench: Option<f64>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.orgs == 0 || args.seconds == 0 {
        bail!("--clients, --orgs and --seconds must be at least 1");
    }
    let workloads = if args.workloads.is_empty() {
        vec![
            Workload::Consume,
            Workload::Allowance,
            Workload::Balance,
            Workload::Health,
        ]
    } else {
        args.workloads.clone()
    };
    let connections = if args.connections.is_empty() {
        vec![args.clients]
    } else {
        args.connections.clone()
    };
    if let Some(bad) = connections.iter().find(|&&c| c == 0 || c > args.clients) {
        bail!(
            "--connections: {bad} is not between 1 and --clients ({})",
            args.clients
        );
    }
    let secret = std::env::var("BILLING_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    let keys = JwtKeys::new(SecretString::from(secret.clone()));

    let scratch = std::env::temp_dir().join(format!(
        "billing-bench-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", scratch.display()));
    let (urls, server) = match &args.target {
        Some(target) => (
            target
                .split(',')
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>(),
            None,
        ),
        None => {
            let vars = [
                ("DATABASE_URL", database_url.clone()),
                ("BILLING_JWT_SECRET", secret.clone()),
                ("GRPC_ADDR", "127.0.0.1:0".to_owned()),
                ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
                ("RUST_LOG", "warn".to_owned()),
            ];
            let config = Config::from_lookup(|k| {
                vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
            })?;
            let listeners = Listeners {
                grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            };
            let server = crate::start(config, listeners, ServerOptions::default()).await?;
            (vec![format!("http://{}", server.grpc_addr)], Some(server))
        }
    };
    let backend = if args.target.is_some() {
        "remote"
    } else if database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "billing bench: {} callers over {} orgs, connections {connections:?}, {} s per run, {backend}, servers {}",
        args.clients,
        args.orgs,
        args.seconds,
        urls.join(",")
    );
    anyhow::ensure!(!urls.is_empty(), "--target: no server URL given");

    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let orgs: Vec<String> = (0..args.orgs)
        .map(|i| format!("bench-{}-{i}", &run_id[..8]))
        .collect();
    let setup = connect(&urls[0]).await?;
    let now = chrono::Utc::now().timestamp();
    let admin = keys.issue("bench", "ops", Role::Admin, now, 3600);
    let mut admin_client = pb::admin_service_client::AdminServiceClient::new(setup);
    for org in &orgs {
        let mut request = Request::new(pb::ManualAdjustRequest {
            org_id: org.clone(),
            amount_micros: 1_000_000_000 * 1_000_000,
            reason: "benchmark credits".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {admin}").parse()?);
        admin_client
            .manual_adjust(request)
            .await
            .context("granting benchmark credits")?;
    }

    let scale = args.pgbench_scale.unwrap_or(args.clients).max(args.clients);
    let pgbench_db = if backend == "postgres" && !args.no_pgbench {
        Some(pgbench_init(&database_url, scale).await?)
    } else {
        None
    };

    println!(
        "{:<15} {:>5} {:>9} {:>11} {:>9} {:>9} {:>9} {:>7}",
        "workload", "conns", "calls", "calls/s", "p50 ms", "p99 ms", "p999 ms", "errors"
    );
    let mut runs = Vec::new();
    for &conns in &connections {
        for &workload in &workloads {
            // pgbench runs just before each Consume run, so the ratio
            // compares two measurements taken seconds apart (this
            // machine's speed drifts over minutes).
            let pgbench = match (&pgbench_db, workload) {
                (Some(scratch), Workload::Consume) => {
                    checkpoint(&database_url).await?;
                    let (tps, timeline) = pgbench_run(scratch, args.clients, args.seconds).await?;
                    println!(
                        "{:<15} {:>5} {:>9} {:>11.0}   (pgbench TPC-B -i -s {scale}; -c {} -j 2 -T {})",
                        "pgbench", "", "", tps, args.clients, args.seconds
                    );
                    if args.timeline {
                        print_timeline(&timeline);
                    }
                    Some(tps)
                }
                _ => None,
            };
            if backend == "postgres" {
                checkpoint(&database_url).await?;
            }
            let figures = drive(&urls, &keys, &orgs, &args, workload, conns).await?;
            println!(
                "{:<15} {:>5} {:>9} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                workload.method(),
                conns,
                figures.calls,
                figures.rate(),
                figures.percentile(0.50),
                figures.percentile(0.99),
                figures.percentile(0.999),
                figures.errors
            );
            if args.timeline {
                print_timeline(&figures.timeline);
            }
            runs.push(Run {
                workload,
                connections: conns,
                figures,
                pgbench,
            });
        }
    }
    if pgbench_db.is_some() {
        pgbench_drop(&database_url).await?;
    }
    print_ratios(&runs);
    if let Some(server) = server {
        server.shutdown().await?;
    }
    let _ = std::fs::remove_file(&scratch);
    Ok(())
}

/// The ratios the README reports, per connection count.
fn print_ratios(runs: &[Run]) {
    let find = |workload: Workload, connections: usize| {
        runs.iter()
            .find(|r| r.workload == workload && r.connections == connections)
            .map(|r| &r.figures)
    };
    for run in runs {
        let c = run.connections;
        let f = &run.figures;
        match run.workload {
            Workload::Consume => {
                if let Some(tps) = run.pgbench {
                    println!(
                        "ratio Consume / pgbench TPC-B, {c} connections: {:.2}x (p99 {:.2} ms)",
                        f.rate() / tps,
                        f.percentile(0.99)
                    );
                }
            }
            Workload::Allowance | Workload::Balance => {
                if let Some(health) = find(Workload::Health, c) {
                    println!(
                        "ratio {} / health check, {c} connections: {:.2}x",
                        run.workload.method(),
                        f.rate() / health.rate()
                    );
                }
            }
            Workload::Mixed | Workload::Health => {}
        }
    }
}

/// One hold of `org`: `Reserve` 2,000 tokens' worth, then `Commit` 1,000
/// tokens of it. Whether both succeeded.
async fn hold_cycle(
    usage: &mut pb::usage_service_client::UsageServiceClient<Channel>,
    token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    org: &str,
    key: &str,
) -> bool {
    let mut reserve = Request::new(pb::ReserveRequest {
        org_id: org.to_owned(),
        meter: Some("ai_tokens".into()),
        quantity: Some(2000),
        idempotency_key: key.to_owned(),
        ..Default::default()
    });
    reserve
        .metadata_mut()
        .insert("authorization", token.clone());
    let Ok(hold) = usage.reserve(reserve).await else {
        return false;
    };
    let mut commit = Request::new(pb::CommitRequest {
        reservation_id: hold.into_inner().reservation_id,
        meter: "ai_tokens".into(),
        quantity: 1000,
        ..Default::default()
    });
    commit.metadata_mut().insert("authorization", token.clone());
    usage.commit(commit).await.is_ok()
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))
}

/// `clients` callers over `connections` connections (round robin) for the
/// configured time; each caller waits for its answer before its next call.
async fn drive(
    urls: &[String],
    keys: &JwtKeys,
    orgs: &[String],
    args: &BenchArgs,
    workload: Workload,
    connections: usize,
) -> anyhow::Result<Figures> {
    let now = chrono::Utc::now().timestamp();
    let bearer = |token: String| -> anyhow::Result<tonic::metadata::MetadataValue<_>> {
        Ok(format!("Bearer {token}").parse()?)
    };
    let service = bearer(keys.issue("bench", "internal", Role::Service, now, 3600))?;
    let users = orgs
        .iter()
        .map(|org| bearer(keys.issue("bench-user", org, Role::User, now, 3600)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let users = Arc::new(users);
    let orgs = Arc::new(orgs.to_vec());
    // At least one connection per server, so every replica is loaded.
    let connections = connections.max(urls.len());
    let mut channels = Vec::with_capacity(connections);
    for i in 0..connections {
        channels.push(connect(&urls[i % urls.len()]).await?);
    }
    let warmup = Duration::from_secs(2);
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + Duration::from_secs(args.seconds);
    let run_tag = uuid::Uuid::new_v4().simple().to_string();
    let done = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample(done.clone(), measure_from, args.seconds));
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let channel = channels[client % connections].clone();
        let (service, users, orgs) = (service.clone(), users.clone(), orgs.clone());
        let tag = format!("{}-{client}", &run_tag[..8]);
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
            let mut credits =
                pb::credits_service_client::CreditsServiceClient::new(channel.clone());
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut errors = 0usize;
            let mut i = 0usize;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let org = (client + i) % orgs.len();
                let ok = match workload {
                    Workload::Mixed if org % 2 == 1 => {
                        hold_cycle(&mut usage, &service, &orgs[org], &format!("{tag}-{i}")).await
                    }
                    Workload::Consume | Workload::Mixed => {
                        let mut request = Request::new(pb::ConsumeRequest {
                            org_id: orgs[org].clone(),
                            meter: "ai_tokens".into(),
                            quantity: 1000,
                            idempotency_key: format!("{tag}-{i}"),
                            ..Default::default()
                        });
                        request
                            .metadata_mut()
                            .insert("authorization", service.clone());
                        usage.consume(request).await.is_ok()
                    }
                    Workload::Allowance => {
                        let mut request = Request::new(pb::CheckAllowanceRequest {
                            org_id: orgs[org].clone(),
                        });
                        request
                            .metadata_mut()
                            .insert("authorization", service.clone());
                        usage.check_allowance(request).await.is_ok()
                    }
                    Workload::Balance => {
                        let mut request = Request::new(pb::GetBalanceRequest {});
                        request
                            .metadata_mut()
                            .insert("authorization", users[org].clone());
                        credits.get_balance(request).await.is_ok()
                    }
                    Workload::Health => {
                        let request = Request::new(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        });
                        health.check(request).await.is_ok()
                    }
                };
                if t0 >= measure_from {
                    if ok {
                        latencies.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors += 1;
                    }
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies_us.extend(l);
        errors += e;
    }
    latencies_us.sort_unstable();
    Ok(Figures {
        calls: latencies_us.len(),
        errors,
        seconds: args.seconds as f64,
        latencies_us,
        timeline: sampler.await?,
    })
}

/// The machine's CPU time so far, in clock ticks, from `/proc/stat`
/// (Linux; `None` elsewhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CpuTicks {
    /// User, nice, system, irq and softirq time.
    busy: u64,
    /// Time a virtual machine's CPUs were ready but the host ran something
    /// else.
    steal: u64,
    /// Everything, idle and I/O wait included.
    total: u64,
    /// This process's user and system time (`/proc/self/stat`): with the
    /// service in process, the service and its load generator; the rest of
    /// `busy` is mostly PostgreSQL.
    own: u64,
}

impl CpuTicks {
    fn now() -> Option<Self> {
        let mut ticks = Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)?;
        ticks.own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| own_ticks(&stat))
            .unwrap_or(0);
        Some(ticks)
    }

    /// The first (all-CPU) line of `/proc/stat`: user nice system idle
    /// iowait irq softirq steal (guest time is already inside user).
    fn parse(stat: &str) -> Option<Self> {
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6);
        let steal = field(7);
        Some(Self {
            busy,
            steal,
            total: busy + field(3) + field(4) + steal,
            own: 0,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            busy: self.busy.saturating_sub(before.busy),
            steal: self.steal.saturating_sub(before.steal),
            total: self.total.saturating_sub(before.total),
            own: self.own.saturating_sub(before.own),
        }
    }

    /// `part` as a percentage of the whole.
    fn percent(self, part: u64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        100.0 * part as f64 / self.total as f64
    }
}

/// A process's user and system time in clock ticks, from its
/// `/proc/<pid>/stat` line: fields 14 and 15, counted after the command
/// name (which may hold spaces and parentheses, so from its last `)`).
fn own_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// One second of a run: calls answered (or pgbench's transactions) and the
/// machine's CPU time in it.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    calls: f64,
    cpu: Option<CpuTicks>,
}

/// `seconds` one-second samples from `from` on: the growth of `done` and
/// of the machine's CPU time.
async fn sample(done: Arc<AtomicU64>, from: Instant, seconds: u64) -> Vec<Second> {
    let mut tick = tokio::time::interval_at(from.into(), Duration::from_secs(1));
    tick.tick().await;
    let (mut calls, mut cpu) = (done.load(Ordering::Relaxed), CpuTicks::now());
    let mut timeline = Vec::with_capacity(seconds as usize);
    for _ in 0..seconds {
        tick.tick().await;
        let (calls_now, cpu_now) = (done.load(Ordering::Relaxed), CpuTicks::now());
        timeline.push(Second {
            calls: calls_now.saturating_sub(calls) as f64,
            cpu: cpu_now.zip(cpu).map(|(now, before)| now.since(before)),
        });
        (calls, cpu) = (calls_now, cpu_now);
    }
    timeline
}

/// The run second by second (`--timeline`), and how busy the machine was
/// over the whole of it.
fn print_timeline(timeline: &[Second]) {
    let calls: Vec<String> = timeline.iter().map(|s| format!("{:.0}", s.calls)).collect();
    println!("  per second: {}", calls.join(" "));
    let cpu: Vec<CpuTicks> = timeline.iter().filter_map(|s| s.cpu).collect();
    if cpu.is_empty() {
        return;
    }
    let row = |part: fn(&CpuTicks) -> u64| -> String {
        cpu.iter()
            .map(|c| format!("{:.0}", c.percent(part(c))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("  CPU busy %: {}", row(|c| c.busy));
    println!("  of it this process %: {}", row(|c| c.own));
    println!("  CPU steal %: {}", row(|c| c.steal));
    let all = cpu.iter().fold(CpuTicks::default(), |a, c| CpuTicks {
        busy: a.busy + c.busy,
        steal: a.steal + c.steal,
        total: a.total + c.total,
        own: a.own + c.own,
    });
    println!(
        "  machine over the run: {:.0} % busy ({:.0} % this process), {:.1} % stolen by the host",
        all.percent(all.busy),
        all.percent(all.own),
        all.percent(all.steal)
    );
}

/// The scratch database `billing_pgbench` of the server behind
/// `database_url`, created and initialised for pgbench at `scale`; returns
/// its URL.
async fn pgbench_init(database_url: &str, scale: usize) -> anyhow::Result<String> {
    let scratch = crate::db::sibling_database_url(database_url, "billing_pgbench");
    on_server(
        database_url,
        &[
            "DROP DATABASE IF EXISTS billing_pgbench",
            "CREATE DATABASE billing_pgbench",
        ],
    )
    .await?;
    println!("pgbench: initialising at scale {scale}…");
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string(), &scratch])
        .output()
        .context("running pgbench (install postgresql-contrib / the PostgreSQL client tools)")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    Ok(scratch)
}

/// One pgbench TPC-B run on `scratch`; returns its tps, and its seconds
/// one by one (pgbench's own progress reports, `-P 1`).
async fn pgbench_run(
    scratch: &str,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<(f64, Vec<Second>)> {
    let args = [
        "-c".to_owned(),
        clients.to_string(),
        "-j".into(),
        "2".into(),
        "-T".into(),
        seconds.to_string(),
        "-P".into(),
        "1".into(),
        scratch.to_owned(),
    ];
    let cpu = tokio::spawn(sample(Arc::default(), Instant::now(), seconds));
    let out =
        tokio::task::spawn_blocking(move || Command::new("pgbench").args(args).output()).await??;
    let mut timeline = cpu.await?;
    let progress = String::from_utf8_lossy(&out.stderr);
    let per_second = progress.lines().filter_map(|l| {
        l.strip_prefix("progress: ")?
            .split(", ")
            .nth(1)?
            .strip_suffix(" tps")?
            .parse::<f64>()
            .ok()
    });
    for (second, tps) in timeline.iter_mut().zip(per_second) {
        second.calls = tps;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench output: {text}{progress}"))?;
    Ok((tps, timeline))
}

/// A PostgreSQL `CHECKPOINT` before each measured run: what the previous
/// run (or pgbench's initialisation, hundreds of megabytes) left dirty is
/// written out now, not during the next measurement. Each run, pgbench's
/// and the service's, starts from the same clean state.
async fn checkpoint(database_url: &str) -> anyhow::Result<()> {
    on_server(database_url, &["CHECKPOINT"])
        .await
        .context("CHECKPOINT before a run (needs a superuser or pg_checkpoint)")
}

async fn pgbench_drop(database_url: &str) -> anyhow::Result<()> {
    on_server(database_url, &["DROP DATABASE IF EXISTS billing_pgbench"]).await
}

/// Runs `statements` in turn on a connection of their own to
/// `database_url`, closed afterwards.
async fn on_server(database_url: &str, statements: &[&str]) -> anyhow::Result<()> {
    let admin = Database::connect(database_url).await?;
    for sql in statements {
        admin.execute_unprepared(sql).await?;
    }
    admin.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_from_the_first_line_of_proc_stat() {
        let before = CpuTicks::parse("cpu  100 5 50 800 20 3 2 20 0 0\ncpu0 1 2 3\n")
            .expect("a /proc/stat line");
        assert_eq!(
            before,
            CpuTicks {
                busy: 160,
                steal: 20,
                total: 1000,
                own: 0,
            }
        );
        assert_eq!(
            own_ticks("4242 (billing (x) y) S 1 2 3 4 5 6 7 8 9 10 170 30 0 0 20"),
            Some(200)
        );
        let after = CpuTicks::parse("cpu  180 5 70 900 20 3 2 40 0 0").expect("parsed");
        let run = after.since(before);
        assert_eq!(run.total, 220);
        assert!((run.percent(run.busy) - 100.0 * 100.0 / 220.0).abs() < 1e-9);
        assert!((run.percent(run.steal) - 100.0 * 20.0 / 220.0).abs() < 1e-9);
        assert_eq!(CpuTicks::parse("intr 1 2 3"), None);
    }
}
