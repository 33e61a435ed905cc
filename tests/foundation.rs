//! The service foundation end to end: catalog over gRPC, grpc-web and REST;
//! health and reflection; authentication and roles on both transports; the
//! REST envelope, fallbacks, OpenAPI, CORS; migrations and the CLI.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use billing::{auth::Role, clock::SystemClock, pb};
use common::{Backend, TestServer, authed, backends, json_of, reason};
use prost::Message as _;
use serde_json::{Value, json};
use tonic::Code;

type R = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn catalog_over_grpc() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let ch = t.channel().await;

        let packs = pb::packs_service_client::PacksServiceClient::new(ch.clone())
            .list_packs(pb::ListPacksRequest {})
            .await?
            .into_inner()
            .packs;
        let summary: Vec<(&str, i64, i64)> = packs
            .iter()
            .map(|p| (p.id.as_str(), p.credits, p.price_cents))
            .collect();
        assert_eq!(
            summary,
            [
                ("pack-1", 100, 1999),
                ("pack-2", 500, 4999),
                ("pack-3", 1100, 9999)
            ],
            "{backend:?}"
        );
        assert!(
            packs
                .iter()
                .all(|p| p.limit_per_cycle == 3 && p.currency == "USD")
        );

        let rates = pb::credits_service_client::CreditsServiceClient::new(ch.clone())
            .list_rates(pb::ListRatesRequest {})
            .await?
            .into_inner()
            .rates;
        for meter in ["storage_egress", "ai_tokens"] {
            assert_eq!(
                rates
                    .iter()
                    .filter(|r| r.meter == meter && r.model.is_none())
                    .count(),
                1,
                "one default rate for {meter}"
            );
        }
        assert!(
            rates
                .iter()
                .any(|r| r.meter == "ai_tokens" && r.model.is_some())
        );

        let plans = pb::subscriptions_service_client::SubscriptionsServiceClient::new(ch)
            .list_plans(pb::ListPlansRequest {})
            .await?
            .into_inner()
            .plans;
        let codes: Vec<(&str, i32)> = plans.iter().map(|p| (p.code.as_str(), p.tier)).collect();
        assert_eq!(
            codes,
            [
                ("SUB_BASE", 0),
                ("SUB_STARTER", 1),
                ("SUB_PRO", 2),
                ("SUB_ENTERPRISE", 3)
            ]
        );
        let pro = &plans[2];
        assert_eq!(
            (
                pro.price_monthly_cents,
                pro.price_yearly_cents,
                pro.credits_included
            ),
            (999, 9990, 10000)
        );
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn catalog_over_rest_in_the_seeds_shapes() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let packs: Value = t
            .http
            .get(t.rest("/credits/packs"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            packs,
            json!({
                "success": true,
                "data": [
                    {"id": "pack-1", "name": "Pack 1", "code": "PACK_1", "credits": 100, "price": 19.99},
                    {"id": "pack-2", "name": "Pack 2", "code": "PACK_2", "credits": 500, "price": 49.99},
                    {"id": "pack-3", "name": "Pack 3", "code": "PACK_3", "credits": 1100, "price": 99.99}
                ]
            }),
            "{backend:?}"
        );

        let rates: Value = t
            .http
            .get(t.rest("/credits/rates"))
            .send()
            .await?
            .json()
            .await?;
        let rates = rates["data"].as_array().ok_or("data is an array")?;
        for rate in rates {
            let keys: Vec<&str> = rate
                .as_object()
                .ok_or("object")?
                .keys()
                .map(String::as_str)
                .collect();
            let mut keys = keys;
            keys.sort_unstable();
            assert_eq!(
                keys,
                [
                    "credits_per_unit",
                    "description",
                    "id",
                    "meter",
                    "model",
                    "unit"
                ]
            );
        }
        let default_egress = rates
            .iter()
            .find(|r| r["meter"] == "storage_egress" && r["model"].is_null())
            .ok_or("default storage_egress rate")?;
        assert_eq!(default_egress["unit"], "GB");
        assert!(default_egress["credits_per_unit"].is_number());

        let plans: Value = t
            .http
            .get(t.rest("/subscription/plans"))
            .send()
            .await?
            .json()
            .await?;
        let pro = plans["data"]
            .as_array()
            .ok_or("data")?
            .iter()
            .find(|p| p["code"] == "SUB_PRO")
            .ok_or("SUB_PRO")?
            .clone();
        assert_eq!(pro["name"], "Pro");
        assert_eq!(pro["price_monthly"], 999);
        assert_eq!(pro["price_yearly"], 9990);
        assert_eq!(pro["credits_included"], 10000);
        assert!(pro["features"].is_array());
        assert!(
            pro.get("tier").is_none(),
            "public plans show the seed's fields only"
        );
        t.stop().await;
    }
    Ok(())
}

/// Frames a protobuf message for grpc-web (flag 0, big-endian length).
fn grpc_web_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Splits a grpc-web response body into (data frames, trailer text).
fn grpc_web_frames(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut data = Vec::new();
    let mut trailers = String::new();
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let payload = &body[5..5 + len];
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(payload));
        } else {
            data.push(payload.to_vec());
        }
        body = &body[5 + len..];
    }
    (data, trailers)
}

#[tokio::test]
async fn catalog_over_grpc_web_all_content_types() -> R {
    let t = TestServer::start(Backend::Sqlite).await;
    let url = format!("{}/billing.v1.PacksService/ListPacks", t.grpc_url());
    let frame = grpc_web_frame(&pb::ListPacksRequest {}.encode_to_vec());

    for content_type in ["application/grpc-web", "application/grpc-web+proto"] {
        let response = t
            .http
            .post(&url)
            .header("content-type", content_type)
            .header("x-grpc-web", "1")
            .body(frame.clone())
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        let body = response.bytes().await?;
        let (data, trailers) = grpc_web_frames(&body);
        assert!(
            trailers.contains("grpc-status:0"),
            "{content_type}: {trailers}"
        );
        let packs = pb::ListPacksResponse::decode(data[0].as_slice())?.packs;
        assert_eq!(packs.len(), 3, "{content_type}");
    }

    let b64 = base64::engine::general_purpose::STANDARD;
    let response = t
        .http
        .post(&url)
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .body(b64.encode(&frame))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let text = response.text().await?;
    // The text variant may base64 each frame separately (padded segments
    // back to back), so decode quantum by quantum.
    let mut body = Vec::new();
    for quantum in text.trim().as_bytes().chunks(4) {
        body.extend(b64.decode(quantum)?);
    }
    let (data, trailers) = grpc_web_frames(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert_eq!(
        pb::ListPacksResponse::decode(data[0].as_slice())?
            .packs
            .len(),
        3
    );

    // An authenticated method over grpc-web without a token: UNAUTHENTICATED (16).
    let response = t
        .http
        .post(format!(
            "{}/billing.v1.CreditsService/GetBalance",
            t.grpc_url()
        ))
        .header("content-type", "application/grpc-web+proto")
        .body(grpc_web_frame(&[]))
        .send()
        .await?;
    let status_header = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = response.bytes().await?;
    let (_, trailers) = grpc_web_frames(&body);
    assert!(
        status_header.as_deref() == Some("16") || trailers.contains("grpc-status:16"),
        "{status_header:?} {trailers}"
    );
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn health_is_serving_overall_and_per_service() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(t.channel().await);
        let mut names = vec![String::new()];
        names.extend(billing::grpc::SERVICE_NAMES.iter().map(|s| s.to_string()));
        for service in names {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner()
                .status();
            assert_eq!(
                status,
                tonic_health::pb::health_check_response::ServingStatus::Serving,
                "{backend:?} {service:?}"
            );
        }
        let ready = t.http.get(t.rest("/readyz")).send().await?;
        assert_eq!(ready.status(), 200);
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn reflection_lists_every_service_v1_and_v1alpha() -> R {
    use tonic_reflection::pb::{v1, v1alpha};
    let t = TestServer::start(Backend::Sqlite).await;
    let ch = t.channel().await;
    let expected: Vec<String> = billing::grpc::SERVICE_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1::server_reflection_client::ServerReflectionClient::new(ch.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = stream.message().await?.ok_or("a reflection answer")?;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        return Err("expected a service list".into());
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in &expected {
        assert!(
            names.contains(name),
            "v1 reflection misses {name}: {names:?}"
        );
    }
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"));

    // v1alpha: resolve a service's file descriptor by symbol.
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "billing.v1.UsageService".into(),
            ),
        ),
    };
    let mut stream = v1alpha::server_reflection_client::ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = stream.message().await?.ok_or("a reflection answer")?;
    assert!(matches!(
        answer.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
            if !f.file_descriptor_proto.is_empty()
    ));
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn grpc_auth_rejects_missing_bad_expired_and_wrong_role() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let ch = t.channel().await;
        let mut credits = pb::credits_service_client::CreditsServiceClient::new(ch.clone());
        let mut usage = pb::usage_service_client::UsageServiceClient::new(ch.clone());
        let mut admin = pb::admin_service_client::AdminServiceClient::new(ch);

        let err = credits
            .get_balance(pb::GetBalanceRequest {})
            .await
            .err()
            .ok_or("no token must fail")?;
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::Unauthenticated, "UNAUTHORIZED")
        );

        let forged = billing::auth::JwtKeys::new("another-secret".to_owned().into()).issue(
            "u",
            "org-a",
            Role::User,
            chrono::Utc::now().timestamp(),
            600,
        );
        let err = credits
            .get_balance(authed(&forged, pb::GetBalanceRequest {}))
            .await
            .err()
            .ok_or("bad signature must fail")?;
        assert_eq!(err.code(), Code::Unauthenticated);

        let expired = t.keys.issue(
            "u",
            "org-a",
            Role::User,
            chrono::Utc::now().timestamp() - 7200,
            3600,
        );
        let err = credits
            .get_balance(authed(&expired, pb::GetBalanceRequest {}))
            .await
            .err()
            .ok_or("expired must fail")?;
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("expired"), "{}", err.message());

        let user = t.token(Role::User, "org-a");
        let consume = pb::ConsumeRequest {
            org_id: "org-a".into(),
            meter: "ai_tokens".into(),
            quantity: 10,
            idempotency_key: "k".into(),
            ..Default::default()
        };
        for token in [user.clone(), t.token(Role::Admin, "org-a")] {
            let err = usage
                .consume(authed(&token, consume.clone()))
                .await
                .err()
                .ok_or("only role service may consume")?;
            assert_eq!(
                (err.code(), reason(&err).as_str()),
                (Code::PermissionDenied, "FORBIDDEN")
            );
        }
        let err = admin
            .list_plans(authed(&user, pb::AdminListPlansRequest {}))
            .await
            .err()
            .ok_or("users may not call admin")?;
        assert_eq!(err.code(), Code::PermissionDenied);
        let err = credits
            .get_balance(authed(
                &t.token(Role::Service, "org-a"),
                pb::GetBalanceRequest {},
            ))
            .await
            .err()
            .ok_or("services may not call user endpoints")?;
        assert_eq!(err.code(), Code::PermissionDenied);

        // The right role gets through the layer.
        let plans = admin
            .list_plans(authed(
                &t.token(Role::Admin, "ops"),
                pb::AdminListPlansRequest {},
            ))
            .await?
            .into_inner()
            .plans;
        assert_eq!(plans.len(), 4);
        t.stop().await;
    }
    Ok(())
}

async fn rest_error(
    response: reqwest::Response,
) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let (status, body) = json_of(response).await?;
    assert_eq!(body["success"], false, "{body}");
    assert!(body["message"].is_string(), "{body}");
    Ok((status, body))
}

#[tokio::test]
async fn rest_auth_rejects_missing_bad_expired_and_wrong_role() -> R {
    for backend in backends() {
        let t = TestServer::start(backend).await;
        let balance = t.rest("/credits/balance");

        let (status, body) = rest_error(t.http.get(&balance).send().await?).await?;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (401, Some("UNAUTHORIZED"))
        );

        let (status, _) =
            rest_error(t.http.get(&balance).bearer_auth("not.a.jwt").send().await?).await?;
        assert_eq!(status, 401);

        let expired = t.keys.issue(
            "u",
            "org-a",
            Role::User,
            chrono::Utc::now().timestamp() - 7200,
            3600,
        );
        let (status, _) =
            rest_error(t.http.get(&balance).bearer_auth(expired).send().await?).await?;
        assert_eq!(status, 401);

        let user = t.token(Role::User, "org-a");
        let (status, body) = rest_error(
            t.http
                .get(t.rest("/admin/billing/plans"))
                .bearer_auth(&user)
                .send()
                .await?,
        )
        .await?;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (403, Some("FORBIDDEN"))
        );

        let admin = t.token(Role::Admin, "ops");
        let plans: Value = t
            .http
            .get(t.rest("/admin/billing/plans"))
            .bearer_auth(&admin)
            .send()
            .await?
            .json()
            .await?;
        let pro = plans["data"]
            .as_array()
            .ok_or("data")?
            .iter()
            .find(|p| p["code"] == "SUB_PRO")
            .ok_or("pro")?
            .clone();
        assert_eq!(pro["tier"], 2);
        assert_eq!(pro["active"], true);
        t.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn rest_envelope_fallbacks_and_admin_route_checks() -> R {
    let t = TestServer::start(Backend::Sqlite).await;
    let (status, body) = rest_error(t.http.get(t.rest("/no/such/route")).send().await?).await?;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (404, Some("NOT_FOUND"))
    );

    let (status, body) = rest_error(t.http.delete(t.rest("/credits/packs")).send().await?).await?;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (405, Some("METHOD_NOT_ALLOWED"))
    );

    // An admin route: authenticated first (401), then the role (403).
    let coupons = t.rest("/admin/billing/coupons");
    let (status, _) = rest_error(t.http.get(&coupons).send().await?).await?;
    assert_eq!(status, 401);
    let user = t.token(Role::User, "org-a");
    let (status, body) = rest_error(t.http.get(&coupons).bearer_auth(&user).send().await?).await?;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (403, Some("FORBIDDEN"))
    );

    let health = t.http.get(t.rest("/healthz")).send().await?;
    assert_eq!(health.status(), 200);
    let metrics = t.http.get(t.rest("/metrics")).send().await?.text().await?;
    assert!(
        metrics.contains(
            "billing_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} "
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("billing_grpc_requests_total{"),
        "{metrics}"
    );
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn openapi_documents_every_contract_route() -> R {
    let t = TestServer::start(Backend::Sqlite).await;
    let doc: Value = t
        .http
        .get(t.rest("/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let routes = [
        ("get", "/credits/balance"),
        ("get", "/credits/transactions"),
        ("get", "/credits/stats/monthly"),
        ("get", "/credits/packs"),
        ("get", "/credits/rates"),
        ("post", "/credits/packs/buy"),
        ("get", "/user/credits/info"),
        ("get", "/orders"),
        ("get", "/orders/{id}"),
        ("get", "/subscription/plans"),
        ("post", "/checkin"),
        ("post", "/payment/create-session"),
        ("post", "/subscription/portal"),
        ("post", "/payment/webhook/stripe"),
        ("post", "/payment/webhook/creem"),
        ("get", "/admin/billing/plans"),
        ("post", "/admin/billing/plans"),
        ("put", "/admin/billing/plans/{id}"),
        ("get", "/admin/billing/coupons"),
        ("post", "/admin/billing/coupons"),
        ("put", "/admin/billing/coupons/{id}"),
        ("get", "/admin/credits/transactions"),
        ("post", "/admin/credits/manual"),
        ("get", "/admin/checkin/config"),
        ("put", "/admin/checkin/config"),
        ("get", "/checkin/status"),
        ("get", "/admin/audit"),
        ("get", "/admin/billing/packs"),
        ("post", "/admin/billing/packs"),
        ("put", "/admin/billing/packs/{id}"),
        ("get", "/admin/billing/rates"),
        ("post", "/admin/billing/rates"),
        ("put", "/admin/billing/rates/{id}"),
        ("delete", "/admin/billing/rates/{id}"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];
    for (method, path) in routes {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    // Every status a route answers is documented, in the shape it has.
    let statuses = |method: &str, path: &str| -> Vec<String> {
        doc["paths"][path][method]["responses"]
            .as_object()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    };
    let info = statuses("get", "/user/credits/info");
    assert!(info.contains(&"402".to_owned()) && !info.contains(&"401".to_owned()));
    for status in ["404", "409", "413", "415", "401", "403", "400", "503"] {
        assert!(
            statuses("put", "/admin/billing/plans/{id}").contains(&status.to_owned()),
            "PUT /admin/billing/plans/{{id}} documents {status}"
        );
    }
    assert!(statuses("post", "/credits/packs/buy").contains(&"429".to_owned()));
    assert_eq!(
        doc["components"]["schemas"]["PlanCreateBody"]["required"],
        serde_json::json!(["code", "name"])
    );
    // Swagger UI, from the binary, reading this document.
    let page = t.http.get(t.rest("/docs/")).send().await?;
    assert_eq!(page.status(), 200);
    assert!(page.text().await?.contains("swagger-ui"));
    let init = t
        .http
        .get(t.rest("/docs/swagger-initializer.js"))
        .send()
        .await?
        .text()
        .await?;
    assert!(init.contains("\"/openapi.json\""), "{init}");
    assert!(doc["paths"]["/credits/balance"]["get"]["security"].is_array());
    assert!(doc["paths"]["/credits/packs"]["get"]["security"].is_null());
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn cors_echoes_only_allowed_origins() -> R {
    let allowed = "http://app.example";
    let t = TestServer::start_with(
        Backend::Sqlite,
        &[("CORS_ALLOWED_ORIGINS", allowed)],
        Arc::new(SystemClock),
    )
    .await;
    for url in [
        t.rest("/credits/packs"),
        format!("{}/billing.v1.PacksService/ListPacks", t.grpc_url()),
    ] {
        let preflight = t
            .http
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", allowed)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-grpc-web,authorization",
            )
            .send()
            .await?;
        assert_eq!(
            preflight
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.as_bytes()),
            Some(allowed.as_bytes()),
            "{url}"
        );
        let other = t
            .http
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", "http://evil.example")
            .header("access-control-request-method", "POST")
            .send()
            .await?;
        assert!(
            other.headers().get("access-control-allow-origin").is_none(),
            "{url}"
        );
    }
    let simple = t
        .http
        .get(t.rest("/credits/packs"))
        .header("origin", allowed)
        .send()
        .await?;
    assert_eq!(
        simple
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(allowed.as_bytes())
    );
    t.stop().await;

    // Without CORS_ALLOWED_ORIGINS nothing is echoed, and never `*`.
    let t = TestServer::start(Backend::Sqlite).await;
    let response = t
        .http
        .get(t.rest("/credits/packs"))
        .header("origin", allowed)
        .send()
        .await?;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn migrations_apply_on_empty_databases_and_rerun_cleanly() -> R {
    use migration::MigratorTrait as _;
    for backend in backends() {
        let db = common::TestDb::new(backend).await;
        let conn = billing::db::connect(&db.url).await?;
        billing::db::migrate(&conn).await?;
        billing::db::migrate(&conn).await?;
        assert!(
            migration::Migrator::get_pending_migrations(&conn)
                .await?
                .is_empty()
        );

        let now = chrono::Utc::now();
        assert!(billing::catalog::seed_default_catalog(&conn, now).await?);
        assert!(
            !billing::catalog::seed_default_catalog(&conn, now).await?,
            "seeds once"
        );
        assert_eq!(billing::catalog::list_plans(&conn, true).await?.len(), 4);

        // Two servers starting on the same database agree on one catalog
        // (PostgreSQL; a SQLite file takes one process, see below).
        let a = common::start_on(&db.url, &[], Arc::new(SystemClock)).await;
        let b = match backend {
            Backend::Postgres => Some(common::start_on(&db.url, &[], Arc::new(SystemClock)).await),
            Backend::Sqlite => None,
        };
        assert_eq!(
            billing::catalog::list_packs(&conn).await?.len(),
            3,
            "{backend:?}"
        );
        a.shutdown().await?;
        if let Some(b) = b {
            b.shutdown().await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn cli_token_and_migrate() -> R {
    let bin = env!("CARGO_BIN_EXE_billing");
    let out = std::process::Command::new(bin)
        .args([
            "token", "--org", "org-a", "--sub", "alice", "--role", "admin", "--ttl", "60",
        ])
        .env("BILLING_JWT_SECRET", common::JWT_SECRET)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?;
    let caller = billing::auth::JwtKeys::new(common::JWT_SECRET.to_owned().into())
        .verify(token.trim(), chrono::Utc::now().timestamp())?;
    assert_eq!(
        (caller.sub.as_str(), caller.org_id.as_str(), caller.role),
        ("alice", "org-a", Role::Admin)
    );

    let out = std::process::Command::new(bin)
        .args(["token", "--org", "o", "--sub", "s", "--role", "user"])
        .env_remove("BILLING_JWT_SECRET")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BILLING_JWT_SECRET"));

    let out = std::process::Command::new(bin)
        .args(["serve"])
        .env("GRPC_ADDR", "not-an-address")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GRPC_ADDR"));

    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    for _ in 0..2 {
        let out = std::process::Command::new(bin)
            .args(["migrate", "--database-url", &url])
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_refuses_to_start() -> R {
    let t = TestServer::start(Backend::Sqlite).await;
    let second = common::try_start_on(&t.db.url, &[], Arc::new(SystemClock)).await;
    let message = format!("{:#}", second.err().ok_or("a second server started")?);
    assert!(
        message.starts_with("DATABASE_URL:") && message.contains("another billing process"),
        "{message}"
    );
    // Once the first has stopped, the file is free again.
    let url = t.db.url.clone();
    let TestServer { server, db, .. } = t;
    server.shutdown().await?;
    let again = common::start_on(&url, &[], Arc::new(SystemClock)).await;
    again.shutdown().await?;
    drop(db);
    Ok(())
}
