//! Assembles and runs the service: the gRPC server (with grpc-web, CORS,
//! health, reflection and JWT auth) on one listener, the REST gateway on the
//! other, both stopped gracefully through one cancellation token.
//!
//! [`start`] takes already-bound listeners, so tests bind `127.0.0.1:0` and
//! read the chosen ports back from [`RunningServer`].

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http::{HeaderName, HeaderValue, Method};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt as _, util::BoxCloneSyncService};
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    trace::{DefaultOnFailure, TraceLayer},
};

use crate::{
    auth::{AuthLayer, JwtKeys},
    clock::{SharedClock, SystemClock},
    config::Config,
    db,
    gateway::{self, ChannelError, GatewayAuth, GrpcChannel},
    grpc,
    ledger::Ledger,
    metrics::Metrics,
    overload::{Grpc, GuardLayer, Rest},
    payments::{creem::Creem, stripe::Stripe},
    state::AppState,
};
use secrecy::ExposeSecret as _;

/// The two sockets the service answers on.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds `GRPC_ADDR` and `HTTP_ADDR`.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("GRPC_ADDR: cannot bind {}", config.grpc_addr))?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("HTTP_ADDR: cannot bind {}", config.http_addr))?;
        Ok(Self { grpc, http })
    }
}

/// What a test (or an embedding program) may inject.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub clock: SharedClock,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
        }
    }
}

/// A started service.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The keys tokens are checked with (ephemeral when no secret is set).
    pub jwt_keys: JwtKeys,
    /// Whether `jwt_keys` were generated because `BILLING_JWT_SECRET` is unset.
    pub ephemeral_secret: bool,
    pub state: AppState,
    /// Cancelled to stop: health turns NOT_SERVING at once, the listeners
    /// close `SHUTDOWN_DELAY_SECONDS` later.
    shutdown: CancellationToken,
    /// Cancelled when the listeners close; in-flight calls then have
    /// `SHUTDOWN_GRACE_SECONDS` to finish.
    close: CancellationToken,
    grace: Duration,
    /// Stops the ledger writer and the sweeper once the servers have
    /// drained, so calls in flight at shutdown still get their answers.
    background: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// This process's hold on its SQLite file (released when dropped).
    _sqlite_lock: Option<std::fs::File>,
}

impl RunningServer {
    /// The token that stops the service when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the service has stopped (after the token is cancelled,
    /// in-flight calls drain first).
    ///
    /// In-flight calls get `SHUTDOWN_GRACE_SECONDS` from the moment the
    /// listeners close; whatever still runs then is abandoned (a ledger
    /// write is all or nothing: an abandoned one either committed whole or
    /// not at all, and its caller learns nothing either way). The ledger
    /// writers stop last, after their current batch.
    pub async fn wait(self) -> anyhow::Result<()> {
        let aborts: Vec<_> = self.tasks.iter().map(JoinHandle::abort_handle).collect();
        let mut tasks: futures::stream::FuturesUnordered<_> = self.tasks.into_iter().collect();
        let deadline = {
            let close = self.close.clone();
            let grace = self.grace;
            async move {
                close.cancelled().await;
                tokio::time::sleep(grace).await;
            }
        };
        tokio::pin!(deadline);
        let mut first_error = None;
        loop {
            tokio::select! {
                next = futures::StreamExt::next(&mut tasks) => {
                    let Some(outcome) = next else { break };
                    let outcome = outcome.map_err(anyhow::Error::from).and_then(|r| r);
                    if let Err(e) = outcome {
                        // One part failed: stop the others at once.
                        self.shutdown.cancel();
                        self.close.cancel();
                        first_error.get_or_insert(e);
                    }
                }
                () = &mut deadline => {
                    tracing::warn!(
                        grace_seconds = self.grace.as_secs(),
                        "calls still in flight after the shutdown grace; stopping anyway"
                    );
                    for abort in &aborts {
                        abort.abort();
                    }
                    break;
                }
            }
        }
        self.background.cancel();
        first_error.map_or(Ok(()), Err)
    }

    /// Stops the service gracefully and waits for it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// CORS for browsers (grpc-web and REST): only the configured origins are
/// echoed back, never `*`; no layer at all when none are configured.
fn cors_layer(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let header = HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                http::header::CONTENT_TYPE,
                http::header::AUTHORIZATION,
                header("x-grpc-web"),
                header("x-user-agent"),
                header("grpc-timeout"),
            ])
            .expose_headers([
                header("grpc-status"),
                header("grpc-message"),
                header("grpc-status-details-bin"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// A span per gRPC call. Refusals (insufficient credits, bad input…) are
/// answers, not failures of the service: they stay out of the error log.
fn grpc_trace() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::GrpcErrorsAsFailures>,
    crate::telemetry::GrpcSpan,
    tower_http::trace::DefaultOnRequest,
    crate::telemetry::GrpcStatus,
    tower_http::trace::DefaultOnBodyChunk,
    tower_http::trace::DefaultOnEos,
    DefaultOnFailure,
> {
    TraceLayer::new_for_grpc()
        .make_span_with(crate::telemetry::GrpcSpan)
        .on_response(crate::telemetry::GrpcStatus)
        .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG))
}

/// A gateway channel to a remote gRPC server (`billing gateway`).
pub fn remote_channel(upstream: &str) -> anyhow::Result<GrpcChannel> {
    let endpoint = tonic::transport::Endpoint::from_shared(upstream.to_owned())
        .with_context(|| format!("--upstream: `{upstream}` is not a URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint.connect_lazy();
    // The REST call's trace goes on in the gRPC server's spans.
    let channel = ServiceBuilder::new()
        .map_request(|mut req: http::Request<tonic::body::Body>| {
            crate::telemetry::inject_current(req.headers_mut());
            req
        })
        .service(channel);
    Ok(BoxCloneSyncService::new(
        channel.map_err(|e| ChannelError(Box::new(e))),
    ))
}

/// Serves the REST gateway on `listener` until `shutdown`.
pub fn spawn_gateway(
    listener: TcpListener,
    channel: GrpcChannel,
    auth: GatewayAuth,
    config: &Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    let mut app = gateway::router(channel, auth, metrics)
        .layer(GuardLayer::<Rest>::new(
            config.max_in_flight,
            config.request_timeout,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(crate::telemetry::HttpSpan)
                .on_response(crate::telemetry::HttpStatus),
        );
    if let Some(cors) = cors_layer(&config.cors_allowed_origins) {
        app = app.layer(cors);
    }
    tokio::spawn(async move {
        use axum::serve::ListenerExt as _;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("REST gateway")
    })
}

/// The gauges read at each scrape: the writer's queue, pool use, open holds.
fn scrape_hook(state: &AppState) -> crate::metrics::ScrapeHook {
    let state = state.clone();
    Arc::new(move || {
        let state = state.clone();
        Box::pin(async move {
            use crate::metrics::{DB_POOL, HOLDS_OPEN, HOLDS_OPEN_MICROS, QUEUE_DEPTH};
            metrics::gauge!(QUEUE_DEPTH).set(state.ledger.queue_depth() as f64);
            let (in_use, idle) = db::pool_use(&state.db);
            metrics::gauge!(DB_POOL, "pool" => "main", "state" => "in_use").set(f64::from(in_use));
            metrics::gauge!(DB_POOL, "pool" => "main", "state" => "idle").set(f64::from(idle));
            if state.config.database_read_url.is_some() {
                let (in_use, idle) = db::pool_use(&state.read_db);
                metrics::gauge!(DB_POOL, "pool" => "read", "state" => "in_use")
                    .set(f64::from(in_use));
                metrics::gauge!(DB_POOL, "pool" => "read", "state" => "idle").set(f64::from(idle));
            }
            match crate::ledger::reads::open_holds(&state.db).await {
                Ok((count, micros)) => {
                    metrics::gauge!(HOLDS_OPEN).set(count as f64);
                    metrics::gauge!(HOLDS_OPEN_MICROS).set(micros as f64);
                }
                Err(e) => tracing::warn!(error = %e, "cannot count open holds for /metrics"),
            }
        })
    })
}

/// Connects to the database, applies migrations, seeds an empty catalog and
/// starts serving on `listeners`.
pub async fn start(
    config: Config,
    listeners: Listeners,
    options: ServerOptions,
) -> anyhow::Result<RunningServer> {
    crate::install_tls_provider();
    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = listeners.http.local_addr()?;
    let sqlite_lock = db::lock_sqlite_file(&config.database_url)?;
    let db = db::prepare(&config.database_url, config.database_max_connections)
        .await
        .context("DATABASE_URL: cannot open, migrate or seed the database")?;
    let read_db = match &config.database_read_url {
        Some(url) => db::connect_sized(url, config.database_max_connections)
            .await
            .context("DATABASE_READ_URL: cannot connect")?,
        None => db.clone(),
    };

    let (jwt_keys, ephemeral_secret) = match &config.jwt_secret {
        Some(secret) => (JwtKeys::new(secret.clone()), false),
        None => (JwtKeys::ephemeral(), true),
    };
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let close = CancellationToken::new();
    let background = CancellationToken::new();
    let ledger = Ledger::start(
        db.clone(),
        &config.database_url,
        options.clock.clone(),
        background.clone(),
        config.ledger_queue_depth,
        config.rate_refresh,
    )
    .await?;
    crate::ledger::sweeper::spawn(ledger.clone(), background.clone());
    let stripe = match &config.stripe_secret_key {
        Some(key) => Some(Stripe::new(key.expose_secret(), &config.stripe_api_base)?),
        None => None,
    };
    let creem = match &config.creem_api_key {
        Some(key) => Some(Creem::new(key.expose_secret(), &config.creem_api_base)?),
        None => None,
    };
    let state = AppState {
        db,
        read_db,
        config: config.clone(),
        clock: options.clock.clone(),
        ledger,
        stripe,
        creem,
    };
    let metrics = Metrics::with_refresh(scrape_hook(&state));
    Metrics::spawn_upkeep(Duration::from_secs(5), background.clone());

    let (reporter, health_service) = tonic_health::server::health_reporter();
    grpc::set_health(&reporter, true).await;
    let routes = grpc::routes(&state, health_service)?;
    let auth = AuthLayer::new(jwt_keys.clone(), grpc::access_policy, options.clock.clone());

    // The gateway's in-process channel goes through the same auth layer.
    let in_process_service = ServiceBuilder::new()
        .map_response(|r: http::Response<_>| r.map(tonic::body::Body::new))
        .layer(grpc_trace())
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(auth.clone())
        .service(routes.clone());
    let in_process: GrpcChannel = BoxCloneSyncService::new(tower::ServiceExt::<
        http::Request<tonic::body::Body>,
    >::map_err(
        in_process_service,
        |never: Infallible| -> ChannelError { match never {} },
    ));

    let grpc_server = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(grpc_trace())
        .layer(tower::util::option_layer(cors_layer(
            &config.cors_allowed_origins,
        )))
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(tonic_web::GrpcWebLayer::new())
        // Inside grpc-web, so a browser's refused call is translated too.
        .layer(GuardLayer::<Grpc>::new(
            config.max_in_flight,
            config.request_timeout,
        ))
        .layer(auth)
        .add_routes(routes);

    let grpc_task = {
        let shutdown = close.clone();
        // Nagle's algorithm would hold a small answer back until the
        // previous one is acknowledged: with many calls multiplexed on one
        // connection, that is ~40 ms of delayed-ACK stall at the tail.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        tokio::spawn(async move {
            grpc_server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
                .context("gRPC server")
        })
    };
    let gateway_auth = GatewayAuth {
        keys: jwt_keys.clone(),
        clock: options.clock.clone(),
    };
    let http_task = spawn_gateway(
        listeners.http,
        in_process,
        gateway_auth,
        &config,
        metrics,
        close.clone(),
    );

    // Readiness follows the database: NOT_SERVING while it does not answer.
    // On shutdown it turns NOT_SERVING at once, and the listeners close
    // `SHUTDOWN_DELAY_SECONDS` later, so load balancers that watch health
    // stop sending new calls before the doors close.
    let health_task = {
        let (shutdown, close) = (shutdown.clone(), close.clone());
        let delay = config.shutdown_delay;
        let db = state.db.clone();
        tokio::spawn(async move {
            let mut serving = true;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let up = db.ping().await.is_ok();
                if up != serving {
                    tracing::warn!(database_up = up, "database reachability changed");
                    grpc::set_health(&reporter, up).await;
                    serving = up;
                }
            }
            grpc::set_health(&reporter, false).await;
            tracing::info!(
                delay_seconds = delay.as_secs(),
                "shutting down: health is NOT_SERVING; closing the listeners after the delay"
            );
            tokio::select! {
                () = close.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
            close.cancel();
            Ok(())
        })
    };

    tracing::info!(%grpc_addr, %http_addr, "billing service started");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        jwt_keys,
        ephemeral_secret,
        state,
        shutdown,
        close,
        grace: config.shutdown_grace,
        background,
        tasks: vec![grpc_task, http_task, health_task],
        _sqlite_lock: sqlite_lock,
    })
}
