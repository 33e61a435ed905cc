//! Overload protection for both listeners: at most `MAX_IN_FLIGHT` calls
//! are answered at once, and each has `REQUEST_TIMEOUT_SECONDS`.
//!
//! A call past the limit is refused at once rather than queued without
//! bound: gRPC answers `RESOURCE_EXHAUSTED`, REST `429` with `Retry-After: 1`
//! and the error envelope (`error_code` `RESOURCE_EXHAUSTED`). A call that
//! runs past its time answers `DEADLINE_EXCEEDED` / `504 TIMEOUT`; a ledger
//! write it had queued and that had not started is then not run, and one
//! that had started completes (its idempotency key replays it).
//!
//! Health probes, `/metrics` and the documents are never refused, so an
//! overloaded replica is not also restarted by its liveness probe.
//!
//! tower's `LoadShed` + `GlobalConcurrencyLimit` + `Timeout` do the same
//! counting, but cannot exempt probes, and their errors become a gRPC
//! message about "the connection" and a bare REST 500; this layer is the
//! three in one, with each protocol's own answers.

use std::{
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Semaphore;

/// Why a call was answered by the guard.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    Overloaded,
    TimedOut,
}

/// One protocol's side of the guard: which paths it never refuses, and
/// its answers, in its own response body type `B`.
pub trait Protocol<B>: Send + Sync + 'static {
    /// The `listener` label of the in-flight gauge.
    const LISTENER: &'static str;
    fn exempt(path: &str) -> bool;
    fn answer(why: Refusal, timeout: Duration) -> http::Response<B>;
}

/// gRPC: a trailers-only status.
pub struct Grpc;

impl<B: Default> Protocol<B> for Grpc {
    const LISTENER: &'static str = "grpc";

    fn exempt(path: &str) -> bool {
        path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
    }

    fn answer(why: Refusal, timeout: Duration) -> http::Response<B> {
        match why {
            Refusal::Overloaded => tonic::Status::resource_exhausted(
                "the server is answering as many calls as it may (MAX_IN_FLIGHT); retry shortly",
            ),
            Refusal::TimedOut => tonic::Status::deadline_exceeded(format!(
                "not answered within the server's {} s limit (REQUEST_TIMEOUT_SECONDS)",
                timeout.as_secs()
            )),
        }
        .into_http()
    }
}

/// REST: the error envelope.
pub struct Rest;

impl Protocol<axum::body::Body> for Rest {
    const LISTENER: &'static str = "rest";

    fn exempt(path: &str) -> bool {
        matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
            || path.starts_with("/docs")
    }

    fn answer(why: Refusal, timeout: Duration) -> http::Response<axum::body::Body> {
        use axum::response::IntoResponse as _;
        let error = match why {
            Refusal::Overloaded => crate::gateway::envelope::ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "RESOURCE_EXHAUSTED",
                "the server is answering as many requests as it may; retry shortly",
            ),
            Refusal::TimedOut => crate::gateway::envelope::ApiError::new(
                http::StatusCode::GATEWAY_TIMEOUT,
                "TIMEOUT",
                format!(
                    "not answered within the server's {} s limit",
                    timeout.as_secs()
                ),
            ),
        };
        // A 429 carries Retry-After (the envelope adds it).
        error.into_response()
    }
}

/// The layer: `max_in_flight` calls at once, `timeout` each.
pub struct GuardLayer<P> {
    permits: Arc<Semaphore>,
    timeout: Duration,
    protocol: PhantomData<fn() -> P>,
}

impl<P> Clone for GuardLayer<P> {
    fn clone(&self) -> Self {
        Self {
            permits: self.permits.clone(),
            timeout: self.timeout,
            protocol: PhantomData,
        }
    }
}

impl<P> GuardLayer<P> {
    pub fn new(max_in_flight: usize, timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            timeout,
            protocol: PhantomData,
        }
    }
}

impl<S, P> tower::Layer<S> for GuardLayer<P> {
    type Service = Guard<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

pub struct Guard<S, P> {
    inner: S,
    layer: GuardLayer<P>,
}

impl<S: Clone, P> Clone for Guard<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, P, ReqB, ResB> tower::Service<http::Request<ReqB>> for Guard<S, P>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    P: Protocol<ResB>,
    ResB: Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        if P::exempt(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let timeout = self.layer.timeout;
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::SHED, "listener" => P::LISTENER).increment(1);
            return Box::pin(async move { Ok(P::answer(Refusal::Overloaded, timeout)) });
        };
        let in_flight = metrics::gauge!(crate::metrics::IN_FLIGHT, "listener" => P::LISTENER);
        in_flight.increment(1.0);
        let future = self.inner.call(req);
        Box::pin(async move {
            let answer = match tokio::time::timeout(timeout, future).await {
                Ok(answer) => answer,
                Err(_) => Ok(P::answer(Refusal::TimedOut, timeout)),
            };
            in_flight.decrement(1.0);
            drop(permit);
            answer
        })
    }
}
