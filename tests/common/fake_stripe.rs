//! A local stand-in for Stripe's API on `127.0.0.1:0`: customers and
//! checkout sessions, answered with objects as complete as the real client
//! needs, honouring `Idempotency-Key` as Stripe does (same key, same
//! object). It records every request, and can be told to fail or hang.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::Path,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// 500 to everything.
    Failing,
    /// Never answers.
    Hanging,
}

/// One request the fake received: path, Idempotency-Key, decoded form.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    by_key: HashMap<String, Value>,
    subscriptions: HashMap<String, Value>,
    next: u64,
    mode: Option<Mode>,
}

#[derive(Clone, Default)]
pub struct FakeStripe {
    inner: Arc<Mutex<Inner>>,
}

impl FakeStripe {
    /// Starts the fake; returns it and its base URL.
    pub async fn start() -> (Self, String) {
        let fake = Self::default();
        let app = Router::new()
            .route("/v1/customers", post(customers))
            .route("/v1/checkout/sessions", post(sessions))
            .route("/v1/billing_portal/sessions", post(portal))
            .route("/v1/subscriptions/{id}", get(subscription))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, format!("http://{addr}"))
    }

    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = Some(mode);
    }

    /// Makes `GET /v1/subscriptions/{id}` answer `object` (its `id`).
    pub fn put_subscription(&self, object: Value) {
        let id = object["id"].as_str().unwrap().to_owned();
        self.inner.lock().unwrap().subscriptions.insert(id, object);
    }

    pub fn calls(&self, path: &str) -> Vec<Call> {
        let inner = self.inner.lock().unwrap();
        inner
            .calls
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }
}

async fn answer(
    fake: FakeStripe,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
    make: impl FnOnce(u64, &HashMap<String, String>) -> Value,
) -> Response {
    let mode = fake.inner.lock().unwrap().mode.unwrap_or(Mode::Normal);
    match mode {
        Mode::Normal => {}
        Mode::Failing => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"type": "api_error", "message": "fake outage"}})),
            )
                .into_response();
        }
        Mode::Hanging => std::future::pending::<()>().await,
    }
    let form: HashMap<String, String> =
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body)
            .unwrap()
            .into_iter()
            .collect();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut inner = fake.inner.lock().unwrap();
    inner.calls.push(Call {
        path: path.to_owned(),
        idempotency_key: key.clone(),
        form: form.clone(),
    });
    if let Some(previous) = key.as_ref().and_then(|k| inner.by_key.get(k)) {
        return Json(previous.clone()).into_response();
    }
    inner.next += 1;
    let object = make(inner.next, &form);
    if let Some(k) = key {
        inner.by_key.insert(k, object.clone());
    }
    Json(object).into_response()
}

async fn customers(State(fake): State<FakeStripe>, headers: HeaderMap, body: Bytes) -> Response {
    answer(fake, "/v1/customers", headers, body, |n, form| {
        json!({
            "id": format!("cus_{n}"), "object": "customer", "created": 1_800_000_000,
            "livemode": false,
            "metadata": {"org_id": form.get("metadata[org_id]")},
        })
    })
    .await
}

async fn sessions(State(fake): State<FakeStripe>, headers: HeaderMap, body: Bytes) -> Response {
    answer(fake, "/v1/checkout/sessions", headers, body, |n, form| {
        json!({
            "id": format!("cs_test_{n}"), "object": "checkout.session",
            "automatic_tax": {"enabled": false, "liability": null, "provider": null, "status": null},
            "client_reference_id": form.get("client_reference_id"),
            "created": 1_800_000_000, "expires_at": 1_800_086_400,
            "custom_fields": [], "custom_text": {}, "livemode": false,
            "mode": form.get("mode").cloned().unwrap_or_else(|| "payment".into()),
            "payment_method_types": ["card"], "payment_status": "unpaid",
            "shipping_options": [], "status": "open",
            "url": format!("https://checkout.stripe.test/c/pay/cs_test_{n}"),
            "metadata": {
                "order_id": form.get("metadata[order_id]"),
                "org_id": form.get("metadata[org_id]"),
            },
        })
    })
    .await
}

async fn portal(State(fake): State<FakeStripe>, headers: HeaderMap, body: Bytes) -> Response {
    answer(
        fake,
        "/v1/billing_portal/sessions",
        headers,
        body,
        |n, form| {
            json!({
                "id": format!("bps_{n}"), "object": "billing_portal.session",
                "configuration": "bpc_1", "created": 1_800_000_000, "livemode": false,
                "customer": form.get("customer"), "return_url": form.get("return_url"),
                "url": format!("https://billing.stripe.test/p/session/{n}"),
            })
        },
    )
    .await
}

async fn subscription(State(fake): State<FakeStripe>, Path(id): Path<String>) -> Response {
    let path = format!("/v1/subscriptions/{id}");
    let mut inner = fake.inner.lock().unwrap();
    if inner.mode == Some(Mode::Failing) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    inner.calls.push(Call {
        path,
        idempotency_key: None,
        form: HashMap::new(),
    });
    match inner.subscriptions.get(&id) {
        Some(object) => Json(object.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"type": "invalid_request_error",
                "message": format!("No such subscription: '{id}'")}})),
        )
            .into_response(),
    }
}
