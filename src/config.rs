//! Typed configuration from the environment (CONTRACT §1).
//!
//! Every setting has a default or fails start-up with an error that names the
//! variable. An empty variable counts as unset. Secrets are kept as
//! [`SecretString`] so that they never reach a log line or a `Debug` print.

use std::{net::SocketAddr, time::Duration};

use http::HeaderValue;
use secrecy::SecretString;

/// A setting that could not be used; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`: `sqlite://…` (embedded default) or `postgres://…`.
    pub database_url: String,
    /// `DATABASE_READ_URL`: a PostgreSQL that may lag behind `DATABASE_URL`
    /// (a streaming replica, or a pooler's replica port) for the reads that
    /// tolerate it; unset, every read goes to `DATABASE_URL`.
    pub database_read_url: Option<String>,
    /// `GRPC_ADDR`: gRPC, grpc-web, health and reflection.
    pub grpc_addr: SocketAddr,
    /// `HTTP_ADDR`: the REST gateway, health probes, metrics, OpenAPI.
    pub http_addr: SocketAddr,
    /// `BILLING_JWT_SECRET`: HS256 key; unset means an ephemeral one (dev).
    pub jwt_secret: Option<SecretString>,
    /// `SUBSCRIPTION_SYSTEM`: the credits endpoints answer only for `credits`.
    pub subscription_system: String,
    /// `STRIPE_SECRET_KEY`: unset disables the `stripe` channel.
    pub stripe_secret_key: Option<SecretString>,
    /// `STRIPE_WEBHOOK_SECRET` (`whsec_…`): unset makes the webhook answer 503.
    pub stripe_webhook_secret: Option<SecretString>,
    /// `STRIPE_API_BASE`.
    pub stripe_api_base: String,
    /// `CREEM_API_KEY`: unset disables the `creem` channel.
    pub creem_api_key: Option<SecretString>,
    /// `CREEM_WEBHOOK_SECRET`.
    pub creem_webhook_secret: Option<SecretString>,
    /// `CREEM_API_BASE`.
    pub creem_api_base: String,
    /// `PURCHASE_COOLDOWN_SECONDS`: minimum gap between purchase attempts.
    pub purchase_cooldown: Duration,
    /// `CORS_ALLOWED_ORIGINS`: origins echoed back; empty means same-origin.
    pub cors_allowed_origins: Vec<HeaderValue>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// `RUST_LOG`.
    pub log_filter: String,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `LEDGER_QUEUE_DEPTH`: operations that may wait in one writer queue
    /// before callers are refused with RESOURCE_EXHAUSTED.
    pub ledger_queue_depth: usize,
    /// `RATE_REFRESH_SECONDS`: how often each replica reloads the usage
    /// rates, so that a rate changed on one replica prices usage on every
    /// replica within this time.
    pub rate_refresh: Duration,
    /// `MAX_IN_FLIGHT`: calls each listener answers at once; past it a call
    /// is refused at once (RESOURCE_EXHAUSTED / 429) instead of queued.
    pub max_in_flight: usize,
    /// `REQUEST_TIMEOUT_SECONDS`: the longest a call may take.
    pub request_timeout: Duration,
    /// `SHUTDOWN_DELAY_SECONDS`: on SIGTERM, how long health reads
    /// NOT_SERVING while the listeners still accept (so load balancers stop
    /// sending before the doors close).
    pub shutdown_delay: Duration,
    /// `SHUTDOWN_GRACE_SECONDS`: how long in-flight calls may take to drain
    /// after the listeners close; past it the process stops anyway.
    pub shutdown_grace: Duration,
    /// `DATABASE_MAX_CONNECTIONS`: the request pool's size (default 8 on
    /// SQLite, 32 on PostgreSQL; the ledger writers have their own small
    /// pools).
    pub database_max_connections: Option<u32>,
}

/// A whole number from the environment within `range`; `None` when unset.
fn whole_opt(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ConfigError> {
    let Some(raw) = get(var) else {
        return Ok(None);
    };
    match raw.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(ConfigError {
            var,
            message: format!(
                "`{raw}` is not a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        }),
    }
}

/// A whole number from the environment within `range`, or `default`.
fn whole(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    Ok(whole_opt(get, var, range)?.unwrap_or(default))
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let secret = |key: &str| get(key).map(SecretString::from);

        let addr = |var: &'static str, default: &str| -> Result<SocketAddr, ConfigError> {
            let raw = get(var).unwrap_or_else(|| default.to_owned());
            raw.parse().map_err(|e| ConfigError {
                var,
                message: format!("`{raw}` is not a socket address (host:port): {e}"),
            })
        };
        let url = |var: &'static str, default: &str| -> Result<String, ConfigError> {
            let raw = get(var).unwrap_or_else(|| default.to_owned());
            if raw.starts_with("http://") || raw.starts_with("https://") {
                Ok(raw.trim_end_matches('/').to_owned())
            } else {
                Err(ConfigError {
                    var,
                    message: format!("`{raw}` is not an http(s) URL"),
                })
            }
        };

        let database_url =
            get("DATABASE_URL").unwrap_or_else(|| "sqlite://billing.db?mode=rwc".into());
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError {
                var: "DATABASE_URL",
                message: "must start with sqlite: or postgres://".into(),
            });
        }

        let database_read_url = get("DATABASE_READ_URL").filter(|u| !u.trim().is_empty());
        if let Some(read_url) = &database_read_url {
            if !(read_url.starts_with("postgres://") || read_url.starts_with("postgresql://")) {
                return Err(ConfigError {
                    var: "DATABASE_READ_URL",
                    message: "must start with postgres:// (a replica of DATABASE_URL)".into(),
                });
            }
            if database_url.starts_with("sqlite:") {
                return Err(ConfigError {
                    var: "DATABASE_READ_URL",
                    message: "needs a PostgreSQL DATABASE_URL (SQLite has no replicas)".into(),
                });
            }
        }

        let purchase_cooldown = match get("PURCHASE_COOLDOWN_SECONDS") {
            None => Duration::from_secs(10),
            Some(raw) => Duration::from_secs(
                raw.trim()
                    .parse::<u32>()
                    .map_err(|_| ConfigError {
                        var: "PURCHASE_COOLDOWN_SECONDS",
                        message: format!("`{raw}` is not a whole number of seconds"),
                    })?
                    .into(),
            ),
        };

        let rate_refresh = match get("RATE_REFRESH_SECONDS") {
            None => Duration::from_secs(30),
            Some(raw) => match raw.trim().parse::<u64>() {
                Ok(n) if (1..=3600).contains(&n) => Duration::from_secs(n),
                _ => {
                    return Err(ConfigError {
                        var: "RATE_REFRESH_SECONDS",
                        message: format!("`{raw}` is not a whole number of seconds from 1 to 3600"),
                    });
                }
            },
        };

        let ledger_queue_depth = whole(
            &get,
            "LEDGER_QUEUE_DEPTH",
            crate::ledger::engine::DEFAULT_QUEUE_DEPTH as u64,
            1..=1_000_000,
        )? as usize;

        let cors_allowed_origins = match get("CORS_ALLOWED_ORIGINS") {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(|origin| {
                    if origin == "*" {
                        return Err(ConfigError {
                            var: "CORS_ALLOWED_ORIGINS",
                            message: "`*` is not allowed: list the origins".into(),
                        });
                    }
                    if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                        return Err(ConfigError {
                            var: "CORS_ALLOWED_ORIGINS",
                            message: format!("`{origin}` is not an origin (scheme://host[:port])"),
                        });
                    }
                    HeaderValue::from_str(origin.trim_end_matches('/')).map_err(|_| ConfigError {
                        var: "CORS_ALLOWED_ORIGINS",
                        message: format!("`{origin}` is not a valid header value"),
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        let log_format = match get("LOG_FORMAT")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    var: "LOG_FORMAT",
                    message: format!("`{other}` is not one of text, json"),
                });
            }
        };

        let stripe_webhook_secret = get("STRIPE_WEBHOOK_SECRET");
        if let Some(s) = &stripe_webhook_secret
            && !s.starts_with("whsec_")
        {
            return Err(ConfigError {
                var: "STRIPE_WEBHOOK_SECRET",
                message: "must start with whsec_".into(),
            });
        }

        Ok(Self {
            database_url,
            database_read_url,
            grpc_addr: addr("GRPC_ADDR", "127.0.0.1:50051")?,
            http_addr: addr("HTTP_ADDR", "127.0.0.1:8080")?,
            jwt_secret: secret("BILLING_JWT_SECRET"),
            subscription_system: get("SUBSCRIPTION_SYSTEM").unwrap_or_else(|| "credits".into()),
            stripe_secret_key: secret("STRIPE_SECRET_KEY"),
            stripe_webhook_secret: stripe_webhook_secret.map(SecretString::from),
            stripe_api_base: url("STRIPE_API_BASE", "https://api.stripe.com")?,
            creem_api_key: secret("CREEM_API_KEY"),
            creem_webhook_secret: secret("CREEM_WEBHOOK_SECRET"),
            creem_api_base: url("CREEM_API_BASE", "https://api.creem.io")?,
            purchase_cooldown,
            cors_allowed_origins,
            otlp_endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            log_filter: get("RUST_LOG").unwrap_or_else(|| "info".into()),
            log_format,
            ledger_queue_depth,
            rate_refresh,
            max_in_flight: whole(&get, "MAX_IN_FLIGHT", 1024, 1..=1_000_000)? as usize,
            request_timeout: Duration::from_secs(whole(
                &get,
                "REQUEST_TIMEOUT_SECONDS",
                30,
                1..=3600,
            )?),
            shutdown_delay: Duration::from_secs(whole(&get, "SHUTDOWN_DELAY_SECONDS", 0, 0..=300)?),
            shutdown_grace: Duration::from_secs(whole(
                &get,
                "SHUTDOWN_GRACE_SECONDS",
                30,
                1..=3600,
            )?),
            database_max_connections: whole_opt(&get, "DATABASE_MAX_CONNECTIONS", 1..=1000)?
                .map(|n| n as u32),
        })
    }

    /// Whether the credits system is the configured subscription system.
    pub fn credits_enabled(&self) -> bool {
        self.subscription_system == "credits"
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_contract() -> Result<(), ConfigError> {
        let c = config(&[])?;
        assert_eq!(c.database_url, "sqlite://billing.db?mode=rwc");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.purchase_cooldown, Duration::from_secs(10));
        assert!(c.credits_enabled());
        assert!(c.cors_allowed_origins.is_empty());
        assert_eq!(c.stripe_api_base, "https://api.stripe.com");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.rate_refresh, Duration::from_secs(30));
        assert_eq!(c.database_read_url, None);
        Ok(())
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("GRPC_ADDR", "nowhere"),
            ("HTTP_ADDR", "1.2.3.4"),
            ("PURCHASE_COOLDOWN_SECONDS", "-3"),
            ("CORS_ALLOWED_ORIGINS", "*"),
            ("LOG_FORMAT", "xml"),
            ("DATABASE_URL", "mysql://x"),
            ("STRIPE_API_BASE", "ftp://x"),
            ("STRIPE_WEBHOOK_SECRET", "nope"),
            ("RATE_REFRESH_SECONDS", "0"),
            ("DATABASE_READ_URL", "mysql://replica"),
            // A replica of an embedded SQLite file does not exist.
            ("DATABASE_READ_URL", "postgres://replica/billing"),
        ] {
            match config(&[(var, value)]) {
                Err(e) => {
                    assert_eq!(e.var, var);
                    assert!(e.to_string().starts_with(var), "{e}");
                }
                Ok(_) => panic!("{var}={value} was accepted"),
            }
        }
    }

    #[test]
    fn empty_variables_count_as_unset() -> Result<(), ConfigError> {
        let c = config(&[("GRPC_ADDR", ""), ("BILLING_JWT_SECRET", "  ")])?;
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert!(c.jwt_secret.is_none());
        Ok(())
    }
}
