//! `billing bench`: load over real gRPC, with figures anyone can rerun.
//!
//! Starts the service in-process on `127.0.0.1:0` (or targets a running
//! one), gives each benchmark organization plenty of credits, then drives
//! `UsageService.Consume` (or `CreditsService.GetBalance`) from N concurrent
//! clients over M organizations for T seconds and prints throughput and
//! latency percentiles. On PostgreSQL it also runs pgbench's built-in TPC-B
//! script against a scratch database of the same server and prints both
//! figures and their ratio.

use std::{
    process::Command,
    sync::Arc,
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
    /// `CreditsService.GetBalance`.
    Balance,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    pub workload: Workload,
    /// Concurrent clients (each its own HTTP/2 connection).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Organizations the load is spread over.
    #[arg(long, default_value_t = 8)]
    pub orgs: usize,
    /// Seconds of measured load (after 2 s of warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Database of the in-process server (default: a fresh SQLite file).
    /// Use a scratch database: the benchmark writes to it.
    #[arg(long)]
    pub database_url: Option<String>,
    /// A running server to load instead (http://host:port); needs
    /// `BILLING_JWT_SECRET` to match the server's.
    #[arg(long)]
    pub target: Option<String>,
    /// Skip the pgbench comparison on PostgreSQL.
    #[arg(long)]
    pub no_pgbench: bool,
}

struct Figures {
    calls: usize,
    errors: usize,
    seconds: f64,
    latencies_us: Vec<u32>,
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

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.orgs == 0 || args.seconds == 0 {
        bail!("--clients, --orgs and --seconds must be at least 1");
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
    let (url, server) = match &args.target {
        Some(target) => (target.clone(), None),
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
            (format!("http://{}", server.grpc_addr), Some(server))
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
        "billing bench {:?}: {} clients, {} orgs, {} s, {backend}, server {url}",
        args.workload, args.clients, args.orgs, args.seconds
    );

    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let orgs: Vec<String> = (0..args.orgs)
        .map(|i| format!("bench-{}-{i}", &run_id[..8]))
        .collect();
    let setup = connect(&url).await?;
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

    let pgbench = if backend == "postgres" && !args.no_pgbench {
        Some(pgbench(&database_url, args.clients, args.seconds).await?)
    } else {
        None
    };

    let figures = drive(&url, &keys, &orgs, &args).await?;
    println!(
        "{:?}: {} calls in {:.1} s = {:.0} calls/s; latency p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms; {} errors",
        args.workload,
        figures.calls,
        figures.seconds,
        figures.rate(),
        figures.percentile(0.50),
        figures.percentile(0.99),
        figures.percentile(0.999),
        figures.errors
    );
    if let Some(tps) = pgbench {
        println!(
            "pgbench TPC-B (-c {} -j 2 -T {}): {tps:.0} tps; {:?} / pgbench = {:.2}x",
            args.clients,
            args.seconds,
            args.workload,
            figures.rate() / tps
        );
    }
    if let Some(server) = server {
        server.shutdown().await?;
    }
    let _ = std::fs::remove_file(&scratch);
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))
}

async fn drive(
    url: &str,
    keys: &JwtKeys,
    orgs: &[String],
    args: &BenchArgs,
) -> anyhow::Result<Figures> {
    let now = chrono::Utc::now().timestamp();
    let service = Arc::new(keys.issue("bench", "internal", Role::Service, now, 3600));
    let users: Arc<Vec<String>> = Arc::new(
        orgs.iter()
            .map(|org| keys.issue("bench-user", org, Role::User, now, 3600))
            .collect(),
    );
    let orgs = Arc::new(orgs.to_vec());
    let warmup = Duration::from_secs(2);
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let channel = connect(url).await?;
        let (service, users, orgs) = (service.clone(), users.clone(), orgs.clone());
        let workload = args.workload;
        tasks.push(tokio::spawn(async move {
            let mut usage = pb::usage_service_client::UsageServiceClient::new(channel.clone());
            let mut credits = pb::credits_service_client::CreditsServiceClient::new(channel);
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
                    Workload::Consume => {
                        let mut request = Request::new(pb::ConsumeRequest {
                            org_id: orgs[org].clone(),
                            meter: "ai_tokens".into(),
                            quantity: 1000,
                            idempotency_key: format!("c{client}-{i}"),
                            ..Default::default()
                        });
                        if let Ok(v) = format!("Bearer {service}").parse() {
                            request.metadata_mut().insert("authorization", v);
                        }
                        usage.consume(request).await.is_ok()
                    }
                    Workload::Balance => {
                        let mut request = Request::new(pb::GetBalanceRequest {});
                        if let Ok(v) = format!("Bearer {}", users[org]).parse() {
                            request.metadata_mut().insert("authorization", v);
                        }
                        credits.get_balance(request).await.is_ok()
                    }
                };
                if t0 >= measure_from {
                    if ok {
                        latencies.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
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
    })
}

/// pgbench TPC-B on a scratch database `billing_pgbench` of the server
/// behind `database_url`; returns its tps.
async fn pgbench(database_url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let (base, query) = match database_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (database_url, String::new()),
    };
    let server = base.rsplit_once('/').map(|(s, _)| s).unwrap_or(base);
    let scratch = format!("{server}/billing_pgbench{query}");
    let admin = Database::connect(database_url).await?;
    admin
        .execute_unprepared("DROP DATABASE IF EXISTS billing_pgbench")
        .await?;
    admin
        .execute_unprepared("CREATE DATABASE billing_pgbench")
        .await?;
    admin.close().await?;
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", &scratch])
        .output()
        .context("running pgbench (install postgresql-contrib / the PostgreSQL client tools)")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    println!("pgbench: running TPC-B for {seconds} s…");
    let out = Command::new("pgbench")
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            &scratch,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| {
            format!(
                "no tps in pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let admin = Database::connect(database_url).await?;
    admin
        .execute_unprepared("DROP DATABASE IF EXISTS billing_pgbench")
        .await?;
    Ok(tps)
}
