//! `/openapi.json`: an OpenAPI 3.0 document generated from the gateway's own
//! route table, with the envelope and the shapes of the seeds as schemas.

use serde_json::{Map, Value, json};

/// Who may call a REST route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// What the OpenAPI document says of one route.
#[derive(Debug, Clone)]
pub struct RouteDoc {
    pub method: &'static str,
    /// axum and OpenAPI share the `{param}` syntax.
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    pub tag: &'static str,
    pub query: &'static [&'static str],
    pub body: Option<&'static str>,
    pub raw_body: bool,
    pub data: Option<&'static str>,
    pub list: bool,
    pub raw_response: bool,
    /// Statuses beyond the ones every route of its kind can answer, each
    /// with the error codes it carries.
    pub errors: &'static [(u16, &'static str)],
    /// Errors in seed 003's `{"error": CODE}` shape, a bad token as 402.
    pub seed_errors: bool,
}

impl RouteDoc {
    pub fn new(
        method: &'static str,
        path: &'static str,
        summary: &'static str,
        access: Access,
        tag: &'static str,
    ) -> Self {
        Self {
            method,
            path,
            summary,
            access,
            tag,
            query: &[],
            body: None,
            raw_body: false,
            data: None,
            list: false,
            raw_response: false,
            errors: &[],
            seed_errors: false,
        }
    }

    /// Statuses this route answers beyond the common ones.
    pub fn errors(mut self, errors: &'static [(u16, &'static str)]) -> Self {
        self.errors = errors;
        self
    }

    /// Errors as `{"error": CODE}`, a missing or bad token as 402.
    pub fn seed_errors(mut self) -> Self {
        self.seed_errors = true;
        self
    }

    pub fn query(mut self, names: &'static [&'static str]) -> Self {
        self.query = names;
        self
    }

    /// A JSON request body of the named schema.
    pub fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }

    /// A request body taken as raw bytes (webhooks: the signature covers them).
    pub fn raw_body(mut self) -> Self {
        self.raw_body = true;
        self
    }

    /// The named schema of `data` in the success envelope.
    pub fn data(mut self, schema: &'static str) -> Self {
        self.data = Some(schema);
        self
    }

    /// `data` is an array.
    pub fn list(mut self) -> Self {
        self.list = true;
        self
    }

    /// The answer is not in the envelope (probes, metrics, this document).
    pub fn raw_response(mut self) -> Self {
        self.raw_response = true;
        self
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn query_param(name: &str) -> Value {
    let (schema, description) = match name {
        "limit" => (
            json!({"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
            "Rows per page",
        ),
        "offset" => (
            json!({"type": "integer", "minimum": 0, "maximum": 2_147_483_647, "default": 0}),
            "Rows to skip",
        ),
        "months" => (
            json!({"type": "integer", "minimum": 1, "maximum": 24, "default": 12}),
            "Months up to and including the current one",
        ),
        "type" => (
            json!({"type": "string", "enum": ["purchase", "grant", "ai_usage", "storage_egress", "checkin", "coupon", "manual", "refund", "expiry", "reservation"]}),
            "Only rows of this transaction type",
        ),
        "org_id" => (
            json!({"type": "string", "maxLength": 255}),
            "Only this organization",
        ),
        "action" => (
            json!({"type": "string", "maxLength": 64}),
            "Only entries of this action (plan.create, coupon.create, checkin_config.update, manual_adjust, ...)",
        ),
        _ => (json!({"type": "string"}), ""),
    };
    json!({ "name": name, "in": "query", "required": false, "schema": schema, "description": description })
}

fn operation(doc: &RouteDoc) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), doc.summary.into());
    op.insert("tags".into(), json!([doc.tag]));
    let id: String = format!("{} {}", doc.method.to_lowercase(), doc.path)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    op.insert("operationId".into(), id.into());

    let mut params: Vec<Value> = doc
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 64} }))
        .collect();
    params.extend(doc.query.iter().map(|name| query_param(name)));
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }

    if let Some(body) = doc.body {
        op.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": schema_ref(body) } } }),
        );
    } else if doc.raw_body {
        op.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": { "type": "object" } } } }),
        );
    }

    let data = match (doc.data, doc.list) {
        (Some(name), true) => json!({ "type": "array", "items": schema_ref(name) }),
        (Some(name), false) => schema_ref(name),
        (None, true) => json!({ "type": "array", "items": {} }),
        (None, false) => json!({}),
    };
    let ok = if doc.raw_response {
        json!({ "description": "OK" })
    } else {
        let mut props = json!({ "success": { "type": "boolean" }, "data": data });
        if doc.list
            && let Some(p) = props.as_object_mut()
        {
            p.insert("pagination".into(), schema_ref("Pagination"));
        }
        json!({
            "description": "OK",
            "content": { "application/json": { "schema": { "type": "object", "properties": props } } }
        })
    };
    let error_schema = if doc.seed_errors {
        "SeedError"
    } else {
        "Error"
    };
    let error =
        json!({ "content": { "application/json": { "schema": schema_ref(error_schema) } } });
    let mut responses = Map::new();
    responses.insert("200".into(), ok);
    let mut add_error = |code: u16, description: &str| {
        let mut e = error.clone();
        if let Some(obj) = e.as_object_mut() {
            obj.insert("description".into(), description.into());
        }
        responses.insert(code.to_string(), e);
    };
    if !doc.raw_response {
        add_error(
            400,
            "Invalid input (the message names the field) or a failed business rule",
        );
        add_error(500, "Internal error");
        add_error(
            503,
            "The database or a payment provider is unreachable, or the service is shutting down; retry",
        );
    }
    if doc.body.is_some() {
        add_error(413, "PAYLOAD_TOO_LARGE: the body is over 1 MiB");
        add_error(
            415,
            "UNSUPPORTED_MEDIA_TYPE: the body is not sent as application/json",
        );
    }
    if doc.access != Access::Public {
        if doc.seed_errors {
            add_error(402, "INVALID_API_KEY: missing, invalid or expired token");
        } else {
            add_error(401, "UNAUTHORIZED: missing, invalid or expired token");
        }
        add_error(403, "FORBIDDEN: the token's role may not call this route");
        op.insert("security".into(), json!([{ "bearerAuth": [] }]));
    }
    for (status, codes) in doc.errors {
        add_error(*status, codes);
    }
    op.insert("responses".into(), Value::Object(responses));
    Value::Object(op)
}

/// The request bodies a creation takes: the update body's fields, with
/// the ones a creation needs required.
const CREATE_VARIANTS: &[(&str, &str, &[&str])] = &[
    ("PlanCreateBody", "PlanBody", &["code", "name"]),
    ("PackCreateBody", "PackBody", &["code", "name", "credits"]),
    ("RateCreateBody", "RateBody", &["meter", "credits_per_unit"]),
];

/// Fields an update cannot take (the update schema leaves them out).
const UPDATE_OMITS: &[(&str, &[&str])] = &[("RateBody", &["meter", "model"])];

fn schemas() -> Value {
    let mut all = base_schemas();
    if let Some(map) = all.as_object_mut() {
        for (name, base, required) in CREATE_VARIANTS {
            if let Some(mut schema) = map.get(*base).cloned()
                && let Some(obj) = schema.as_object_mut()
            {
                obj.insert("required".into(), json!(required));
                map.insert((*name).into(), schema);
            }
        }
        for (name, omitted) in UPDATE_OMITS {
            if let Some(props) = map
                .get_mut(*name)
                .and_then(|s| s.get_mut("properties"))
                .and_then(Value::as_object_mut)
            {
                for field in *omitted {
                    props.remove(*field);
                }
            }
        }
        // In a request body an optional field may be sent as null, which
        // the service takes as "not given".
        for (name, schema) in map.iter_mut() {
            if !name.ends_with("Body") {
                continue;
            }
            let required: Vec<String> = schema["required"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(props) = schema["properties"].as_object_mut() {
                for (field, prop) in props.iter_mut() {
                    if !required.contains(field)
                        && let Some(p) = prop.as_object_mut()
                    {
                        p.insert("nullable".into(), true.into());
                    }
                }
            }
        }
    }
    all
}

fn base_schemas() -> Value {
    let credits = json!({ "type": "number", "description": "Credits, up to 6 decimals" });
    let credits_at_least_0 = json!({ "type": "number", "minimum": 0, "maximum": 1_000_000_000_000_i64, "multipleOf": 0.000001, "description": "Credits, up to 6 decimals" });
    json!({
        "Error": {
            "type": "object",
            "required": ["success", "error_code", "message"],
            "properties": {
                "success": { "type": "boolean", "enum": [false] },
                "error_code": { "type": "string" },
                "message": { "type": "string" }
            }
        },
        "SeedError": {
            "type": "object",
            "required": ["error"],
            "properties": { "error": { "type": "string" } }
        },
        "Pagination": {
            "type": "object",
            "properties": {
                "limit": { "type": "integer" }, "offset": { "type": "integer" },
                "total": { "type": "integer" }, "has_more": { "type": "boolean" }
            }
        },
        "Pack": {
            "type": "object",
            "properties": {
                "id": { "type": "string" }, "name": { "type": "string" }, "code": { "type": "string" },
                "credits": { "type": "integer" }, "price": { "type": "number", "description": "USD" }
            }
        },
        "Rate": {
            "type": "object",
            "properties": {
                "id": { "type": "string" },
                "meter": { "type": "string", "enum": ["storage_egress", "ai_tokens"] },
                "unit": { "type": "string" },
                "model": { "type": "string", "nullable": true },
                "credits_per_unit": credits,
                "description": { "type": "string" }
            }
        },
        "Plan": {
            "type": "object",
            "properties": {
                "id": { "type": "string" }, "code": { "type": "string" }, "name": { "type": "string" },
                "description": { "type": "string" },
                "price_monthly": { "type": "integer", "description": "cents" },
                "price_yearly": { "type": "integer", "description": "cents" },
                "credits_included": { "type": "integer" },
                "features": { "type": "array", "items": { "type": "string" } }
            }
        },
        "AdminPlan": {
            "allOf": [
                schema_ref("Plan"),
                {
                    "type": "object",
                    "properties": {
                        "tier": { "type": "integer" }, "currency": { "type": "string" }, "active": { "type": "boolean" },
                        "stripe_price_monthly": { "type": "string", "nullable": true },
                        "stripe_price_yearly": { "type": "string", "nullable": true },
                        "creem_product_id": { "type": "string", "nullable": true }
                    }
                }
            ]
        },
        "BuyPackBody": {
            "type": "object",
            "required": ["packId"],
            "properties": {
                "packId": { "type": "string" }, "success_url": { "type": "string", "format": "uri", "pattern": "^https?://" }, "cancel_url": { "type": "string", "format": "uri", "pattern": "^https?://" },
                "coupon_code": { "type": "string" }, "channel": { "type": "string", "enum": ["stripe", "creem"] }
            }
        },
        "CreateSessionBody": {
            "type": "object",
            "required": ["channel", "type", "success_url", "cancel_url"],
            "properties": {
                "channel": { "type": "string", "enum": ["stripe", "creem"] },
                "type": { "type": "string", "enum": ["subscription", "pack"] },
                "plan_id": { "type": "string" }, "pack_id": { "type": "string" },
                "billing_period": { "type": "string", "enum": ["monthly", "yearly"] },
                "success_url": { "type": "string", "format": "uri", "pattern": "^https?://" }, "cancel_url": { "type": "string", "format": "uri", "pattern": "^https?://" },
                "coupon_code": { "type": "string" }
            }
        },
        "PortalBody": {
            "type": "object", "required": ["return_url"],
            "properties": { "return_url": { "type": "string", "format": "uri", "pattern": "^https?://" } }
        },
        "PlanBody": {
            "type": "object",
            "properties": {
                "code": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$" },
                "name": { "type": "string", "minLength": 1, "maxLength": 255 },
                "description": { "type": "string", "maxLength": 1000 },
                "tier": { "type": "integer", "minimum": 0, "maximum": 100 },
                "price_monthly": { "type": "integer", "minimum": 0, "maximum": 1_000_000_000_000_i64, "description": "cents" },
                "price_yearly": { "type": "integer", "minimum": 0, "maximum": 1_000_000_000_000_i64, "description": "cents" },
                "currency": { "type": "string", "pattern": "^[A-Za-z]{3}$" },
                "credits_included": { "type": "integer", "minimum": 0, "maximum": 1_000_000_000_000_i64 },
                "features": { "type": "array", "maxItems": 50, "items": { "type": "string", "minLength": 1, "maxLength": 255 } },
                "active": { "type": "boolean" },
                "stripe_price_monthly": { "type": "string", "maxLength": 255 }, "stripe_price_yearly": { "type": "string", "maxLength": 255 },
                "creem_product_id": { "type": "string", "maxLength": 255 }
            }
        },
        "PackBody": {
            "type": "object",
            "properties": {
                "code": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$" },
                "name": { "type": "string", "minLength": 1, "maxLength": 255 },
                "credits": { "type": "integer", "minimum": 1, "maximum": 1_000_000_000_000_i64 },
                "price_cents": { "type": "integer", "minimum": 0, "maximum": 1_000_000_000_000_i64 },
                "currency": { "type": "string", "pattern": "^[A-Za-z]{3}$" },
                "limit_per_cycle": { "type": "integer", "minimum": 0, "maximum": 1000 },
                "lot_expiry_days": { "type": "integer", "minimum": 1, "maximum": 3650 },
                "active": { "type": "boolean" },
                "stripe_price_id": { "type": "string", "maxLength": 255 },
                "creem_product_id": { "type": "string", "maxLength": 255 }
            }
        },
        "RateBody": {
            "type": "object",
            "description": "On PUT `meter` and `model` cannot be given (a rate for another meter or model is a new rate).",
            "properties": {
                "meter": { "type": "string", "enum": ["storage_egress", "ai_tokens"] },
                "model": { "type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:/-]+$", "description": "Omit for the meter's default rate" },
                "credits_per_unit": { "type": "number", "minimum": 0, "maximum": 1_000_000_000_000_i64, "multipleOf": 0.000001, "description": "Credits one unit (1 GB, 1M tokens) costs" },
                "description": { "type": "string", "maxLength": 255 },
                "active": { "type": "boolean", "description": "A default rate cannot be switched off" }
            }
        },
        "CouponBody": {
            "type": "object", "required": ["code", "kind", "value"],
            "properties": {
                "code": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$" },
                "kind": { "type": "string", "enum": ["percent_off", "amount_off", "bonus_credits"] },
                "value": { "type": "integer", "minimum": 1, "maximum": 1_000_000_000_000_i64, "description": "percent_off: 1-100 percent; amount_off: cents; bonus_credits: whole credits" },
                "max_redemptions": { "type": "integer", "minimum": 1, "maximum": 2_147_483_647 },
                "expires_at": { "type": "string", "format": "date-time" },
                "active": { "type": "boolean" }
            }
        },
        "CouponUpdateBody": {
            "type": "object", "additionalProperties": false,
            "description": "Only the fields given change; code, kind and value cannot",
            "properties": {
                "active": { "type": "boolean" },
                "max_redemptions": { "type": "integer", "minimum": 1, "maximum": 2_147_483_647 },
                "expires_at": { "type": "string", "format": "date-time", "description": "In the future" }
            }
        },
        "ManualBody": {
            "type": "object", "required": ["org_id", "amount", "reason"],
            "properties": {
                "org_id": { "type": "string" },
                "amount": { "type": "number", "minimum": -1_000_000_000_000_i64, "maximum": 1_000_000_000_000_i64, "multipleOf": 0.000001, "not": { "enum": [0] }, "description": "Credits, up to 6 decimals; positive grants, negative debits" },
                "reason": { "type": "string" },
                "expires_at": { "type": "string", "format": "date-time" },
                "idempotency_key": { "type": "string" }
            }
        },
        "CheckinConfigBody": {
            "type": "object",
            "required": ["enabled", "credits_per_day", "lot_expiry_days"],
            "properties": {
                "enabled": { "type": "boolean" }, "credits_per_day": credits_at_least_0.clone(),
                "lot_expiry_days": { "type": "integer", "minimum": 1, "maximum": 3650 }, "streak_bonus": credits_at_least_0
            }
        }
    })
}

/// The whole document for `routes`.
pub fn document(routes: &[RouteDoc]) -> Value {
    let mut paths = Map::new();
    for doc in routes {
        let entry = paths
            .entry(doc.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(item) = entry.as_object_mut() {
            item.insert(doc.method.to_lowercase(), operation(doc));
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Billing service REST gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Credits, packs, subscriptions, check-in and payments. Every route is a translation of a billing.v1 gRPC call."
        },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearerAuth": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
            "schemas": schemas()
        }
    })
}
