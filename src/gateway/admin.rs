//! REST ⇄ gRPC for the operator routes: plans, coupons, packs, rates and
//! the audit log (role `admin`).

use axum::{
    extract::{Query, State},
    http::HeaderMap,
};
use serde::Serialize;
use serde_json::Value;

use super::{
    ApiResult, Gateway,
    credits::{self, Params},
    envelope, grpc_request,
};
use crate::pb;

#[derive(Serialize)]
struct AuditJson {
    id: i64,
    actor: String,
    action: String,
    org_id: Option<String>,
    target: String,
    reason: String,
    before: Value,
    after: Value,
    created_at: Option<String>,
}

pub async fn audit(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(params): Params,
) -> ApiResult {
    let request = pb::ListAuditEntriesRequest {
        page: Some(credits::page(&params)?),
        org_id: credits::text_param(&params, "org_id"),
        action: credits::text_param(&params, "action"),
    };
    let mut client = pb::admin_service_client::AdminServiceClient::new(gw.channel);
    let r = client
        .list_audit_entries(grpc_request(&headers, request))
        .await?
        .into_inner();
    let json = |text: &str| serde_json::from_str(text).unwrap_or(Value::Null);
    let rows: Vec<_> = r
        .entries
        .into_iter()
        .map(|e| AuditJson {
            id: e.id,
            before: json(&e.before_json),
            after: json(&e.after_json),
            actor: e.actor,
            action: e.action,
            org_id: e.org_id,
            target: e.target,
            reason: e.reason,
            created_at: credits::rfc3339(e.created_at),
        })
        .collect();
    Ok(envelope::ok_page(rows, credits::pagination(r.page)))
}
