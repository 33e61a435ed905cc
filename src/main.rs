//! `billing`: serve | migrate | token | gateway (CONTRACT §1).

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use billing::{
    Config, Listeners, ServerOptions,
    auth::{JwtKeys, Role},
    metrics::Metrics,
    server,
};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: the hot path (HTTP/2 frames,
/// protobuf messages, JSON rows for the batch statement) allocates many
/// small short-lived buffers across threads; see the README's Performance.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "billing", version, about = "Credits-based billing service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, seed an empty catalog, serve gRPC and REST.
    Serve {
        /// Overrides DATABASE_URL.
        #[arg(long)]
        database_url: Option<String>,
        /// Overrides GRPC_ADDR.
        #[arg(long)]
        grpc_addr: Option<SocketAddr>,
        /// Overrides HTTP_ADDR.
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Apply pending migrations and exit.
    Migrate {
        /// Overrides DATABASE_URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Print a JWT signed with BILLING_JWT_SECRET.
    Token {
        #[arg(long)]
        org: String,
        #[arg(long)]
        sub: String,
        /// user | admin | service
        #[arg(long)]
        role: Role,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
    },
    /// Measure throughput and latency over real gRPC (see README).
    Bench(billing::bench::BenchArgs),
    /// Sign a webhook body read from standard input as a provider would,
    /// printing the signature header's value (for trying payments locally).
    WebhookSign {
        /// stripe (prints `t=…,v1=…`) or creem (prints the hex HMAC).
        #[arg(long, default_value = "stripe")]
        provider: String,
        /// The webhook secret; defaults to STRIPE_WEBHOOK_SECRET or
        /// CREEM_WEBHOOK_SECRET.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Run only the REST gateway against a remote gRPC server.
    Gateway {
        /// The gRPC server, e.g. http://billing-grpc:50051
        #[arg(long)]
        upstream: String,
        /// Overrides HTTP_ADDR.
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            database_url,
            grpc_addr,
            http_addr,
        } => {
            if let Some(url) = database_url {
                config.database_url = url;
            }
            if let Some(addr) = grpc_addr {
                config.grpc_addr = addr;
            }
            if let Some(addr) = http_addr {
                config.http_addr = addr;
            }
            let telemetry = billing::telemetry::init(&config)?;
            let served = async {
                let listeners = Listeners::bind(&config).await?;
                let running = billing::start(config, listeners, ServerOptions::default()).await?;
                if running.ephemeral_secret {
                    print_dev_tokens(&running.jwt_keys);
                }
                println!(
                    "billing: gRPC + grpc-web on {}, REST on http://{}",
                    running.grpc_addr, running.http_addr
                );
                stop_on_signal(running.shutdown_token());
                running.wait().await
            }
            .await;
            // The last spans (the drain's) go out before the process ends.
            telemetry.shutdown();
            served
        }
        Command::Migrate { database_url } => {
            if let Some(url) = database_url {
                config.database_url = url;
            }
            billing::telemetry::init(&config)?.shutdown();
            let db = billing::db::connect(&config.database_url)
                .await
                .context("DATABASE_URL: cannot connect")?;
            billing::db::migrate(&db)
                .await
                .context("migrations failed")?;
            println!("migrations applied");
            Ok(())
        }
        Command::WebhookSign { provider, secret } => {
            use secrecy::ExposeSecret as _;
            use std::io::Read as _;
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("cannot read the body from standard input")?;
            let configured = match provider.as_str() {
                "stripe" => config.stripe_webhook_secret.as_ref(),
                "creem" => config.creem_webhook_secret.as_ref(),
                other => anyhow::bail!("--provider: unknown provider `{other}` (stripe, creem)"),
            };
            let secret = secret
                .or_else(|| configured.map(|s| s.expose_secret().to_owned()))
                .context("--secret: no secret given and none configured for the provider")?;
            let header = match provider.as_str() {
                "stripe" => billing::payments::stripe::signature::sign(
                    &secret,
                    chrono::Utc::now().timestamp(),
                    &body,
                ),
                _ => billing::payments::creem::signature::sign(&secret, &body),
            };
            println!("{header}");
            Ok(())
        }
        Command::Bench(args) => {
            config.log_filter = "warn".into();
            billing::telemetry::init(&config)?.shutdown();
            billing::bench::run(args).await
        }
        Command::Token {
            org,
            sub,
            role,
            ttl,
        } => {
            let secret = config
                .jwt_secret
                .context("BILLING_JWT_SECRET: must be set to sign tokens")?;
            if ttl <= 0 {
                anyhow::bail!("--ttl: must be a positive number of seconds");
            }
            let now = chrono::Utc::now().timestamp();
            println!("{}", JwtKeys::new(secret).issue(&sub, &org, role, now, ttl));
            Ok(())
        }
        Command::Gateway {
            upstream,
            http_addr,
        } => {
            if let Some(addr) = http_addr {
                config.http_addr = addr;
            }
            let telemetry = billing::telemetry::init(&config)?;
            let channel = server::remote_channel(&upstream)?;
            let secret = config
                .jwt_secret
                .clone()
                .context("BILLING_JWT_SECRET: the gateway must share the gRPC server's secret")?;
            let auth = billing::gateway::GatewayAuth {
                keys: JwtKeys::new(secret),
                clock: Arc::new(billing::clock::SystemClock),
            };
            let listener = tokio::net::TcpListener::bind(config.http_addr)
                .await
                .with_context(|| format!("HTTP_ADDR: cannot bind {}", config.http_addr))?;
            let shutdown = CancellationToken::new();
            stop_on_signal(shutdown.clone());
            println!(
                "billing gateway: REST on http://{} → {upstream}",
                config.http_addr
            );
            let served = server::spawn_gateway(
                listener,
                channel,
                auth,
                &config,
                Metrics::default(),
                shutdown,
            )
            .await;
            telemetry.shutdown();
            served?
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM; in-flight calls then drain.
fn stop_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down: draining in-flight calls");
        token.cancel();
    });
}

fn print_dev_tokens(keys: &JwtKeys) {
    let now = chrono::Utc::now().timestamp();
    let day = 24 * 3600;
    tracing::warn!(
        "BILLING_JWT_SECRET is not set: using an ephemeral secret; tokens die with this process"
    );
    println!(
        "BILLING_JWT_SECRET is not set: dev tokens for org `dev-org`, valid 24 h or until restart:"
    );
    for role in [Role::User, Role::Admin, Role::Service] {
        println!(
            "  {:<8} {}",
            role.as_str(),
            keys.issue(&format!("dev-{}", role.as_str()), "dev-org", role, now, day)
        );
    }
}
