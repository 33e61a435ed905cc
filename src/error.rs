//! The service's one error type and its two wire forms.
//!
//! Every variant carries a stable machine code (the REST `error_code`, the
//! gRPC `ErrorInfo.reason`, domain `billing`). [`Error::grpc_code`] and
//! [`http_status`] are written out case by case so that adding a variant or a
//! code is a compile error until it is mapped. Internal details (database or
//! provider text) are logged, never returned: a 5xx says only "internal error".

use std::collections::HashMap;

use http::StatusCode;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `ErrorInfo.domain` of every billing error.
pub const DOMAIN: &str = "billing";

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Bad input; `field` names what is wrong (a JSON/proto field name).
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("Credits system is not enabled")]
    CreditsNotEnabled,
    #[error("pack not found")]
    PackNotFound,
    #[error("plan not found")]
    PlanNotFound,
    #[error("coupon not found")]
    CouponNotFound,
    #[error("order not found")]
    OrderNotFound,
    #[error("reservation not found")]
    ReservationNotFound,
    #[error(
        "insufficient credits: {needed_micros} micro-credits needed, {available_micros} available"
    )]
    InsufficientCredits {
        needed_micros: i64,
        available_micros: i64,
    },
    #[error("idempotency key was already used with different parameters")]
    IdempotencyKeyReused,
    /// The hold was already finished; how, so that a caller whose Commit
    /// timed out can learn what it charged.
    #[error("reservation is already {status}")]
    ReservationFinished {
        status: &'static str,
        transaction_id: Option<String>,
        charged_micros: Option<i64>,
    },
    #[error("already checked in today")]
    AlreadyCheckedIn,
    #[error("daily check-in is disabled")]
    CheckinDisabled,
    #[error("buying packs needs an active subscription of tier Starter or above")]
    SubscriptionRequired,
    #[error("this pack can be bought at most {limit} times per billing cycle")]
    PackLimitReached { limit: i32 },
    #[error("another purchase was attempted recently; retry in {retry_after} s")]
    PurchaseCooldown {
        retry_after: u64,
        cooldown_seconds: u64,
    },
    #[error("invalid coupon: {0}")]
    InvalidCoupon(String),
    #[error("this item has no Creem product configured")]
    CreemProductNotConfigured,
    #[error("payment provider {0} is not configured")]
    PaymentProviderNotConfigured(&'static str),
    #[error("the organization has no billing account with the provider yet")]
    NoBillingAccount,
    #[error("invalid webhook signature: {0}")]
    InvalidSignature(String),
    #[error("plan code is already taken")]
    PlanCodeTaken,
    #[error("pack code is already taken")]
    PackCodeTaken,
    #[error("coupon code is already taken")]
    CouponCodeTaken,
    #[error("rate not found")]
    RateNotFound,
    #[error("a rate for this meter and model already exists")]
    RateTaken,
    #[error("a meter's default rate cannot be removed or switched off")]
    DefaultRateRequired,
    /// Too many writes are waiting; retry after a short pause.
    #[error("the ledger is overloaded; retry shortly")]
    Overloaded,
    /// A dependency (database, provider) cannot be reached; safe to retry.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected dependency failure; the text is only logged.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    /// A write's database error, where a unique violation means `taken`
    /// (the row's only unique column a write can change is its code): the
    /// unique index decides, also when two writes race.
    pub fn unique_or(e: sea_orm::DbErr, taken: Self) -> Self {
        match e.sql_err() {
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => taken,
            _ => e.into(),
        }
    }

    /// Bad input in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An internal failure; `context` goes to the log only.
    pub fn internal(context: impl std::fmt::Display) -> Self {
        Self::Internal(context.to_string())
    }

    /// The stable machine code: REST `error_code`, gRPC `ErrorInfo.reason`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::Unauthenticated(_) => "UNAUTHORIZED",
            Self::PermissionDenied(_) => "FORBIDDEN",
            Self::CreditsNotEnabled => "CREDITS_NOT_ENABLED",
            Self::PackNotFound => "PACK_NOT_FOUND",
            Self::PlanNotFound => "PLAN_NOT_FOUND",
            Self::CouponNotFound => "COUPON_NOT_FOUND",
            Self::OrderNotFound => "ORDER_NOT_FOUND",
            Self::ReservationNotFound => "RESERVATION_NOT_FOUND",
            Self::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::ReservationFinished { .. } => "RESERVATION_FINISHED",
            Self::AlreadyCheckedIn => "ALREADY_CHECKED_IN",
            Self::CheckinDisabled => "CHECKIN_DISABLED",
            Self::SubscriptionRequired => "SUBSCRIPTION_REQUIRED",
            Self::PackLimitReached { .. } => "PACK_LIMIT_REACHED",
            Self::PurchaseCooldown { .. } => "PURCHASE_COOLDOWN",
            Self::InvalidCoupon(_) => "INVALID_COUPON",
            Self::CreemProductNotConfigured => "CREEM_PRODUCT_NOT_CONFIGURED",
            Self::PaymentProviderNotConfigured(_) => "PAYMENT_PROVIDER_NOT_CONFIGURED",
            Self::NoBillingAccount => "NO_BILLING_ACCOUNT",
            Self::InvalidSignature(_) => "INVALID_SIGNATURE",
            Self::PlanCodeTaken => "PLAN_CODE_TAKEN",
            Self::PackCodeTaken => "PACK_CODE_TAKEN",
            Self::CouponCodeTaken => "COUPON_CODE_TAKEN",
            Self::RateNotFound => "RATE_NOT_FOUND",
            Self::RateTaken => "RATE_TAKEN",
            Self::DefaultRateRequired => "DEFAULT_RATE_REQUIRED",
            Self::Overloaded => "RESOURCE_EXHAUSTED",
            Self::Unavailable(_) => "SERVICE_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL_ERROR",
        }
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } | Self::InvalidCoupon(_) | Self::InvalidSignature(_) => {
                Code::InvalidArgument
            }
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) | Self::SubscriptionRequired => Code::PermissionDenied,
            Self::PackNotFound
            | Self::PlanNotFound
            | Self::CouponNotFound
            | Self::OrderNotFound
            | Self::ReservationNotFound
            | Self::RateNotFound => Code::NotFound,
            Self::IdempotencyKeyReused
            | Self::AlreadyCheckedIn
            | Self::PlanCodeTaken
            | Self::PackCodeTaken
            | Self::CouponCodeTaken
            | Self::RateTaken => Code::AlreadyExists,
            Self::CreditsNotEnabled
            | Self::InsufficientCredits { .. }
            | Self::ReservationFinished { .. }
            | Self::CheckinDisabled
            | Self::PackLimitReached { .. }
            | Self::CreemProductNotConfigured
            | Self::NoBillingAccount
            | Self::DefaultRateRequired => Code::FailedPrecondition,
            Self::PurchaseCooldown { .. } | Self::Overloaded => Code::ResourceExhausted,
            Self::PaymentProviderNotConfigured(_) | Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// Extra machine-readable fields, carried in `ErrorInfo.metadata` and
    /// copied into the REST error body.
    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        match self {
            Self::InvalidArgument { field, .. } => {
                m.insert("field".into(), field.clone());
            }
            Self::PurchaseCooldown {
                retry_after,
                cooldown_seconds,
            } => {
                m.insert("retry_after".into(), retry_after.to_string());
                m.insert("cooldown_seconds".into(), cooldown_seconds.to_string());
            }
            Self::InsufficientCredits {
                needed_micros,
                available_micros,
            } => {
                m.insert("needed_micros".into(), needed_micros.to_string());
                m.insert("available_micros".into(), available_micros.to_string());
            }
            Self::PackLimitReached { limit } => {
                m.insert("limit".into(), limit.to_string());
            }
            Self::ReservationFinished {
                status,
                transaction_id,
                charged_micros,
            } => {
                m.insert("status".into(), (*status).into());
                if let Some(id) = transaction_id {
                    m.insert("transaction_id".into(), id.clone());
                }
                if let Some(charged) = charged_micros {
                    m.insert("charged_micros".into(), charged.to_string());
                }
            }
            Self::Unauthenticated(_)
            | Self::PermissionDenied(_)
            | Self::CreditsNotEnabled
            | Self::PackNotFound
            | Self::PlanNotFound
            | Self::CouponNotFound
            | Self::OrderNotFound
            | Self::ReservationNotFound
            | Self::IdempotencyKeyReused
            | Self::AlreadyCheckedIn
            | Self::CheckinDisabled
            | Self::SubscriptionRequired
            | Self::InvalidCoupon(_)
            | Self::CreemProductNotConfigured
            | Self::PaymentProviderNotConfigured(_)
            | Self::NoBillingAccount
            | Self::InvalidSignature(_)
            | Self::PlanCodeTaken
            | Self::PackCodeTaken
            | Self::CouponCodeTaken
            | Self::RateNotFound
            | Self::RateTaken
            | Self::DefaultRateRequired
            | Self::Overloaded
            | Self::Unavailable(_)
            | Self::Internal(_) => {}
        }
        m
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        if let Error::Internal(detail) = &err {
            tracing::error!(error = %detail, "internal error");
        }
        let details = ErrorDetails::with_error_info(err.code(), DOMAIN, err.metadata());
        Status::with_error_details(err.grpc_code(), err.to_string(), details)
    }
}

impl From<sea_orm::DbErr> for Error {
    fn from(err: sea_orm::DbErr) -> Self {
        if crate::db::is_connection_error(&err) {
            tracing::warn!(error = %err, "database unavailable");
            Self::Unavailable("the database cannot be reached".into())
        } else {
            Self::Internal(format!("database: {err}"))
        }
    }
}

/// The reasons that FAILED_PRECONDITION answers with 409 Conflict on REST
/// (the rest answer 400), as CONTRACT §3 tables them.
const CONFLICT_REASONS: &[&str] = &[
    "INSUFFICIENT_CREDITS",
    "PACK_LIMIT_REACHED",
    "RESERVATION_FINISHED",
    "DEFAULT_RATE_REQUIRED",
];

/// The HTTP status of a gRPC status with the given `ErrorInfo.reason`
/// (CONTRACT §4's mapping).
pub fn http_status(code: Code, reason: Option<&str>) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::FailedPrecondition => {
            if reason.is_some_and(|r| CONFLICT_REASONS.contains(&r)) {
                StatusCode::CONFLICT
            } else {
                StatusCode::BAD_REQUEST
            }
        }
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The REST `error_code` for a status without `ErrorInfo` (e.g. one made by
/// the transport rather than by this service).
pub fn default_reason(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument | Code::OutOfRange => "INVALID_ARGUMENT",
        Code::Unauthenticated => "UNAUTHORIZED",
        Code::PermissionDenied => "FORBIDDEN",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists | Code::Aborted => "CONFLICT",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Unavailable => "SERVICE_UNAVAILABLE",
        Code::Unimplemented => "NOT_IMPLEMENTED",
        Code::DeadlineExceeded => "TIMEOUT",
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => "INTERNAL_ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_error_info() {
        let status: Status = Error::PurchaseCooldown {
            retry_after: 7,
            cooldown_seconds: 10,
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "PURCHASE_COOLDOWN");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(
            info.metadata.get("retry_after").map(String::as_str),
            Some("7")
        );
    }

    #[test]
    fn internal_errors_hide_their_detail() {
        let status: Status = Error::internal("relation \"x\" does not exist").into();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn failed_precondition_maps_to_400_or_409_as_tabled() {
        let fp = Code::FailedPrecondition;
        assert_eq!(
            http_status(fp, Some("INSUFFICIENT_CREDITS")),
            StatusCode::CONFLICT
        );
        assert_eq!(
            http_status(fp, Some("PACK_LIMIT_REACHED")),
            StatusCode::CONFLICT
        );
        assert_eq!(
            http_status(fp, Some("CREDITS_NOT_ENABLED")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(Code::AlreadyExists, Some("ALREADY_CHECKED_IN")),
            StatusCode::CONFLICT
        );
        assert_eq!(
            http_status(Code::Internal, None),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
