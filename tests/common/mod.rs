//! Test harness: starts the real service on `127.0.0.1:0` against a fresh
//! database (a SQLite file in a temp dir, or a new PostgreSQL database when
//! `TEST_DATABASE_URL` is set) and hands out clients and tokens.
//!
//! Every integration test runs once per backend in [`backends`]. Set
//! `REQUIRE_POSTGRES=1` (the `scripts/test` runner does) to fail instead of
//! skipping PostgreSQL when `TEST_DATABASE_URL` is missing.

#![allow(dead_code, clippy::unwrap_used)]

use std::{collections::HashMap, sync::Arc};

use billing::{
    Config, Listeners, RunningServer, ServerOptions,
    auth::{JwtKeys, Role},
    clock::{Clock, SystemClock},
};
use sea_orm::{ConnectionTrait, Database};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

pub mod calls;
pub mod fake_creem;
pub mod fake_stripe;
pub mod invariants;

pub const JWT_SECRET: &str = "integration-test-secret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite always; PostgreSQL when `TEST_DATABASE_URL` is set.
pub fn backends() -> Vec<Backend> {
    let mut out = vec![Backend::Sqlite];
    if std::env::var("TEST_DATABASE_URL").is_ok_and(|v| !v.is_empty()) {
        out.push(Backend::Postgres);
    } else if std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!("REQUIRE_POSTGRES=1 but TEST_DATABASE_URL is not set");
    }
    out
}

/// A fresh, empty database for one test.
pub struct TestDb {
    pub url: String,
    /// The PostgreSQL database's name (`None` on SQLite).
    pub name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("billing.db").display()
                );
                Self {
                    url,
                    name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin_url = std::env::var("TEST_DATABASE_URL").unwrap();
                let name = format!("billing_t_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&admin_url).await.unwrap();
                admin
                    .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                    .await
                    .unwrap();
                admin.close().await.unwrap();
                Self {
                    url: billing::db::sibling_database_url(&admin_url, &name),
                    name: Some(name),
                    _dir: None,
                }
            }
        }
    }
}

/// A running service and what a test needs to talk to it.
pub struct TestServer {
    pub backend: Backend,
    pub server: RunningServer,
    pub db: TestDb,
    pub keys: JwtKeys,
    pub http: reqwest::Client,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, &[], Arc::new(SystemClock)).await
    }

    /// Starts with extra environment settings and a clock.
    pub async fn start_with(backend: Backend, env: &[(&str, &str)], clock: Arc<dyn Clock>) -> Self {
        Self::start_in(backend, TestDb::new(backend).await, env, clock).await
    }

    /// Starts on a database the test made (and perhaps prepared) itself.
    pub async fn start_in(
        backend: Backend,
        db: TestDb,
        env: &[(&str, &str)],
        clock: Arc<dyn Clock>,
    ) -> Self {
        let server = start_on(&db.url, env, clock).await;
        Self {
            backend,
            server,
            db,
            keys: JwtKeys::new(SecretString::from(JWT_SECRET)),
            http: {
                billing::install_tls_provider();
                reqwest::Client::new()
            },
        }
    }

    pub fn rest(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.http_addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.server.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        connect(self.server.grpc_addr).await
    }

    /// A valid token for `sub` in `org` with `role`.
    pub fn token(&self, role: Role, org: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        self.keys.issue(
            &format!("{}-1", role.as_str()),
            org,
            role,
            now,
            30 * 24 * 3600,
        )
    }

    pub async fn stop(self) {
        self.server.shutdown().await.unwrap();
    }
}

/// Starts a server on `database_url` with a fixed JWT secret plus `env`.
pub async fn start_on(
    database_url: &str,
    env: &[(&str, &str)],
    clock: Arc<dyn Clock>,
) -> RunningServer {
    try_start_on(database_url, env, clock).await.unwrap()
}

/// [`start_on`], handing back a refusal to start.
pub async fn try_start_on(
    database_url: &str,
    env: &[(&str, &str)],
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningServer> {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DATABASE_URL".into(), database_url.to_owned()),
        ("BILLING_JWT_SECRET".into(), JWT_SECRET.into()),
        ("GRPC_ADDR".into(), "127.0.0.1:0".into()),
        ("HTTP_ADDR".into(), "127.0.0.1:0".into()),
    ]);
    for (k, v) in env {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let listeners = Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    billing::start(config, listeners, ServerOptions { clock }).await
}

/// A gRPC channel to the server listening on `addr`.
pub async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A gRPC request with `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// A REST response's status code and JSON body.
pub async fn json_of(
    response: reqwest::Response,
) -> Result<(u16, serde_json::Value), Box<dyn std::error::Error>> {
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| {
            assert_eq!(i.domain, "billing");
            i.reason
        })
        .unwrap_or_default()
}
