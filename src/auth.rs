//! Authentication: HS256 JWTs → [`Caller`], and the tower layer that puts the
//! caller into every gRPC request's extensions.
//!
//! Policy: a token must be HS256, signed with `BILLING_JWT_SECRET`, carry an
//! `exp` in the future, and claims `sub`, `org_id`, `role` (user | admin |
//! service). Which roles may call a method is decided per gRPC path by the
//! function given to [`AuthLayer`]; the REST gateway forwards the bearer token
//! as gRPC metadata, so both transports go through this one check.
//!
//! JWT verification is implemented here on `hmac`/`sha2` (HS256 only): the
//! webhook code needs the same primitives, and it avoids pulling an RSA stack
//! that is never used.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tonic::Status;

use crate::{clock::SharedClock, error::Error};

type HmacSha256 = Hmac<Sha256>;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A person acting on their own organization.
    User,
    /// An operator: the admin endpoints, any organization.
    Admin,
    /// An internal service, naming the organization in each request.
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
            Self::Service => "service",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "admin" => Ok(Self::Admin),
            "service" => Ok(Self::Service),
            other => Err(format!("unknown role `{other}` (user, admin, service)")),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user (or service) id, `sub`.
    pub sub: String,
    /// The organization's external id, `org_id`.
    pub org_id: String,
    pub role: Role,
}

/// The claims this service signs and reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub org_id: String,
    pub role: Role,
    /// Expiry, Unix seconds (required).
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// Signs and verifies HS256 tokens with one secret.
#[derive(Clone)]
pub struct JwtKeys {
    secret: SecretString,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

impl JwtKeys {
    pub fn new(secret: SecretString) -> Self {
        Self { secret }
    }

    /// A random 256-bit secret, for `serve` without `BILLING_JWT_SECRET`.
    pub fn ephemeral() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self::new(SecretString::from(hex::encode(bytes)))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        HmacSha256::new_from_slice(self.secret.expose_secret().as_bytes())
            .expect("hmac key of any length")
    }

    /// A signed token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// A token for `sub` in `org_id` with `role`, valid for `ttl_secs`.
    pub fn issue(&self, sub: &str, org_id: &str, role: Role, now: i64, ttl_secs: i64) -> String {
        self.sign(&Claims {
            sub: sub.to_owned(),
            org_id: org_id.to_owned(),
            role,
            exp: now.saturating_add(ttl_secs),
            iat: Some(now),
            nbf: None,
        })
    }

    /// Verifies `token` at Unix time `now` and returns its caller.
    pub fn verify(&self, token: &str, now: i64) -> Result<Caller, Error> {
        let bad = |why: &str| Error::Unauthenticated(format!("invalid token: {why}"));
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not a JWT"));
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(header_b64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| bad("malformed header"))?;
        if header.alg != "HS256" {
            return Err(bad("algorithm must be HS256"));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| bad("malformed signature"))?;
        let mut mac = self.mac();
        mac.update(header_b64.as_bytes());
        mac.update(b".");
        mac.update(payload_b64.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| bad("signature does not match"))?;

        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| bad("claims must include sub, org_id, role and exp"))?;
        if claims.exp <= now {
            return Err(Error::Unauthenticated("token expired".into()));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now) {
            return Err(bad("token not valid yet"));
        }
        if claims.sub.is_empty() || claims.org_id.is_empty() {
            return Err(bad("sub and org_id must not be empty"));
        }
        Ok(Caller {
            sub: claims.sub,
            org_id: claims.org_id,
            role: claims.role,
        })
    }
}

/// Who may call a gRPC path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed (catalog reads, webhooks, health, reflection).
    Public,
    /// A valid token with one of these roles.
    Roles(&'static [Role]),
}

/// Returns the access rule of a gRPC path (`/package.Service/Method`).
pub type AccessPolicy = fn(&str) -> Access;

/// The bearer token of an `authorization` header value.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Authenticates a request's `authorization` value against `access`.
pub fn authorize(
    keys: &JwtKeys,
    access: Access,
    authorization: Option<&str>,
    now: i64,
) -> Result<Option<Caller>, Error> {
    let Access::Roles(roles) = access else {
        return Ok(None);
    };
    let token = authorization
        .and_then(bearer_token)
        .ok_or_else(|| Error::Unauthenticated("missing bearer token".into()))?;
    let caller = keys.verify(token, now)?;
    if !roles.contains(&caller.role) {
        let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        return Err(Error::PermissionDenied(format!(
            "role {} may not call this method (needs {})",
            caller.role.as_str(),
            allowed.join(" or ")
        )));
    }
    Ok(Some(caller))
}

/// Tower layer: authenticates every gRPC request and inserts its [`Caller`].
#[derive(Clone)]
pub struct AuthLayer {
    inner: Arc<AuthState>,
}

struct AuthState {
    keys: JwtKeys,
    policy: AccessPolicy,
    clock: SharedClock,
}

impl AuthLayer {
    pub fn new(keys: JwtKeys, policy: AccessPolicy, clock: SharedClock) -> Self {
        Self {
            inner: Arc::new(AuthState {
                keys,
                policy,
                clock,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.inner.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<AuthState>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let access = (self.state.policy)(req.uri().path());
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let now = self.state.clock.now().timestamp();
        match authorize(&self.state.keys, access, header, now) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    // The call's span (see `telemetry::GrpcSpan`) names the
                    // token's organization.
                    tracing::Span::current().record("org", caller.org_id.as_str());
                    req.extensions_mut().insert(caller);
                }
                // Take the instance that was driven to readiness.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(err) => {
                let status: Status = err.into();
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The caller that [`AuthLayer`] put into a request.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<&Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .ok_or_else(|| Error::Unauthenticated("missing bearer token".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::new(SecretString::from("test-secret"))
    }

    #[test]
    fn round_trip() -> Result<(), Error> {
        let token = keys().issue("u1", "org-a", Role::User, 1_000, 60);
        let caller = keys().verify(&token, 1_030)?;
        assert_eq!(caller.sub, "u1");
        assert_eq!(caller.org_id, "org-a");
        assert_eq!(caller.role, Role::User);
        Ok(())
    }

    #[test]
    fn rejects_expired_wrong_key_tampered_and_other_algorithms() {
        let token = keys().issue("u1", "org-a", Role::User, 1_000, 60);
        assert!(keys().verify(&token, 1_060).is_err(), "expired at exp");
        let other = JwtKeys::new(SecretString::from("other"));
        assert!(other.verify(&token, 1_001).is_err(), "wrong key");
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged =
            URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","org_id":"org-b","role":"admin","exp":9999}"#);
        parts[1] = &forged;
        assert!(keys().verify(&parts.join("."), 1_001).is_err(), "tampered");
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            token.split('.').nth(1).unwrap_or_default()
        );
        assert!(keys().verify(&none_alg, 1_001).is_err(), "alg none");
        assert!(keys().verify("garbage", 1_001).is_err());
    }

    #[test]
    fn roles_are_enforced() {
        let token = keys().issue("u1", "org-a", Role::User, 1_000, 60);
        let header = format!("Bearer {token}");
        let only_service = Access::Roles(&[Role::Service]);
        assert!(matches!(
            authorize(&keys(), only_service, Some(&header), 1_001),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            authorize(&keys(), only_service, None, 1_001),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            authorize(&keys(), Access::Public, None, 1_001),
            Ok(None)
        ));
    }
}
