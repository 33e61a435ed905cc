//! Credits-based billing service.
//!
//! Internal services spend credits over gRPC (`UsageService`); browsers and
//! operators read and top them up through gRPC, grpc-web or the REST gateway,
//! which translates every route into a gRPC call. [`server::start`] binds what
//! it is given, so tests run the whole service on `127.0.0.1:0`.

pub mod audit;
pub mod auth;
pub mod bench;
pub mod catalog;
pub mod checkin;
pub mod clock;
pub mod config;
pub mod coupons;
pub mod db;
pub mod domain;
pub mod entities;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod ledger;
pub mod metrics;
pub mod overload;
pub mod payments;
pub mod pb;
pub mod server;
pub mod state;
pub mod telemetry;

pub use config::Config;

/// Makes ring the process's TLS crypto provider (outbound HTTPS to Stripe
/// and Creem; async-stripe is built on ring too). Idempotent; the server
/// calls it on start, and any other user of an HTTPS client should too.
pub fn install_tls_provider() {
    // An error means a provider is installed already: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub use error::{Error, Result};
pub use server::{Listeners, RunningServer, ServerOptions, start};
