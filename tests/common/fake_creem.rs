//! A local stand-in for Creem's API on `127.0.0.1:0`: checkouts and the
//! customer portal, checking the `x-api-key` header. It records every
//! request body, and can be told to fail.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

/// The API key the fake accepts.
pub const API_KEY: &str = "creem_test_key";

#[derive(Default)]
struct Inner {
    calls: Vec<(String, Value)>,
    next: u64,
    failing: bool,
}

#[derive(Clone, Default)]
pub struct FakeCreem {
    inner: Arc<Mutex<Inner>>,
}

impl FakeCreem {
    /// Starts the fake; returns it and its base URL.
    pub async fn start() -> (Self, String) {
        let fake = Self::default();
        let app = Router::new()
            .route("/v1/checkouts", post(checkouts))
            .route("/v1/customers/billing", post(billing))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, format!("http://{addr}"))
    }

    pub fn set_failing(&self, failing: bool) {
        self.inner.lock().unwrap().failing = failing;
    }

    /// The bodies received on `path`.
    pub fn calls(&self, path: &str) -> Vec<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .calls
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

fn check(fake: &FakeCreem, headers: &HeaderMap, path: &str, body: &Value) -> Option<Response> {
    let mut inner = fake.inner.lock().unwrap();
    if inner.failing {
        return Some(StatusCode::BAD_GATEWAY.into_response());
    }
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(API_KEY) {
        return Some(StatusCode::FORBIDDEN.into_response());
    }
    inner.calls.push((path.to_owned(), body.clone()));
    inner.next += 1;
    None
}

async fn checkouts(
    State(fake): State<FakeCreem>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = check(&fake, &headers, "/v1/checkouts", &body) {
        return refused;
    }
    let n = fake.inner.lock().unwrap().next;
    Json(json!({
        "id": format!("ch_creem_{n}"), "object": "checkout", "mode": "test",
        "product": body["product_id"], "request_id": body["request_id"],
        "status": "pending", "metadata": body["metadata"],
        "checkout_url": format!("https://checkout.creem.test/ch_creem_{n}"),
    }))
    .into_response()
}

async fn billing(
    State(fake): State<FakeCreem>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = check(&fake, &headers, "/v1/customers/billing", &body) {
        return refused;
    }
    let customer = body["customer_id"].as_str().unwrap_or_default().to_owned();
    Json(json!({"customer_portal_link": format!("https://creem.test/portal/{customer}")}))
        .into_response()
}
