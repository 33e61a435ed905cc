//! The REST envelope (CONTRACT §3): `{"success": true, "data": …}` and
//! `{"success": false, "error_code", "message"}`, plus exact decimal numbers
//! and the JSON body extractor that turns every malformed input into a
//! 400/413/415 in the error envelope.

use axum::{
    Json,
    body::Bytes,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use tonic::Status;
use tonic_types::StatusExt;
use utoipa::ToSchema;

use crate::{
    domain::{cents_to_decimal, micros_to_decimal},
    error::{Error, default_reason, http_status},
};

/// A JSON number written from exact decimal text (never through `f64`).
#[derive(Debug, Clone)]
pub struct Num(Box<RawValue>);

impl Num {
    fn from_decimal(text: String) -> Self {
        // Decimal text made by `domain::money` is always a valid JSON number.
        Self(RawValue::from_string(text).unwrap_or_else(|_| zero()))
    }

    /// Micro-credits as whole credits with up to 6 decimals.
    pub fn credits(micros: i64) -> Self {
        Self::from_decimal(micros_to_decimal(micros))
    }

    /// Cents as currency units with up to 2 decimals.
    pub fn money(cents: i64) -> Self {
        Self::from_decimal(cents_to_decimal(cents))
    }
}

fn zero() -> Box<RawValue> {
    serde_json::value::to_raw_value(&0).unwrap_or_default()
}

/// In the document: a JSON number, exact to its decimals.
impl utoipa::PartialSchema for Num {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::Number)
            .description(Some(
                "An exact decimal: credits with up to 6 decimals, money with up to 2",
            ))
            .into()
    }
}

impl ToSchema for Num {
    fn name() -> std::borrow::Cow<'static, str> {
        "Decimal".into()
    }
}

impl Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[derive(Serialize, ToSchema)]
pub struct Pagination {
    pub limit: i32,
    pub offset: i32,
    pub total: i64,
    pub has_more: bool,
}

#[derive(Serialize)]
struct Success<T> {
    success: bool,
    data: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    pagination: Option<Pagination>,
}

/// `200 {"success": true, "data": data}`.
pub fn ok<T: Serialize>(data: T) -> Response {
    Json(Success {
        success: true,
        data,
        pagination: None,
    })
    .into_response()
}

/// `200 {"success": true, "data": data, "pagination": …}`.
pub fn ok_page<T: Serialize>(data: T, pagination: Pagination) -> Response {
    Json(Success {
        success: true,
        data,
        pagination: Some(pagination),
    })
    .into_response()
}

/// An error answered in the envelope.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
            extra: serde_json::Map::new(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Status::from(err).into()
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let info = status.get_details_error_info();
        let reason = info.as_ref().map(|i| i.reason.as_str());
        let http = http_status(status.code(), reason);
        let code = reason
            .unwrap_or_else(|| default_reason(status.code()))
            .to_owned();
        // A 5xx that did not come from this service's own error type may
        // carry transport internals: say only what kind of failure it was.
        let message = if http.is_server_error() && info.is_none() {
            match http {
                StatusCode::SERVICE_UNAVAILABLE => "service unavailable".to_owned(),
                StatusCode::NOT_IMPLEMENTED => "not implemented".to_owned(),
                _ => "internal error".to_owned(),
            }
        } else {
            status.message().to_owned()
        };
        let mut extra = serde_json::Map::new();
        if let Some(info) = info {
            for (key, value) in info.metadata {
                let value = value
                    .parse::<i64>()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::String(value));
                extra.insert(key, value);
            }
        }
        Self {
            status: http,
            code,
            message,
            extra,
        }
    }
}

/// The error envelope: `success` false, a stable `error_code`, a message
/// naming what is wrong, and any details of the error beside them
/// (`retry_after`, `cooldown_seconds`, how a hold finished, ...).
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub(super) struct ErrorBody {
    #[schema(schema_with = super::openapi::false_only)]
    success: bool,
    error_code: String,
    message: String,
    #[serde(flatten)]
    #[schema(ignore)]
    extra: serde_json::Map<String, serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut extra = self.extra;
        for reserved in ["success", "error_code", "message"] {
            extra.remove(reserved);
        }
        // A 429 says when to come back: the cooldown's own figure when it
        // has one, else a second.
        let retry_after = (self.status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            extra
                .get("retry_after")
                .and_then(serde_json::Value::as_i64)
                .filter(|s| *s > 0)
                .unwrap_or(1)
                .to_string()
        });
        let body = ErrorBody {
            success: false,
            error_code: self.code,
            message: self.message,
            extra,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = retry_after
            && let Ok(value) = http::HeaderValue::from_str(&seconds)
        {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, value);
        }
        response
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// A JSON object body, deserialized into `T`, whose rejections are
/// answered in the error envelope: 415 for a wrong content type, 413 for an
/// oversized body, 400 naming the field for malformed JSON or a wrong type,
/// and 400 for a body that is empty or not an object (serde alone would take
/// `[]` or `["X", 10]` for a struct, field by position).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "expected Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| json_rejection(JsonRejection::BytesRejection(e)))?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => {}
            None => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "body: is empty; expected a JSON object",
                ));
            }
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "body: expected a JSON object",
                ));
            }
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `application/json` or any `application/*+json`, parameters allowed.
fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| {
            m.type_() == "application"
                && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
        })
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    // The content type is checked before the body is read
    // (`json_content_type`), so it is not among these.
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            body_error(&e.body_text()),
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            format!("body: malformed JSON: {}", e.body_text()),
        ),
        JsonRejection::BytesRejection(e) => {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PAYLOAD_TOO_LARGE",
                    "request body is too large",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "body: could not be read",
                )
            }
        }
        other => ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            other.body_text(),
        ),
    }
}

/// serde's message, led by the field path it names (`packId: invalid type…`).
fn body_error(text: &str) -> String {
    // axum: "Failed to deserialize the JSON body into the target type: <path>: <serde msg>"
    let detail = text
        .split_once("target type: ")
        .map(|(_, rest)| rest)
        .unwrap_or(text);
    detail.to_owned()
}
