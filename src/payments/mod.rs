//! How credits are bought: orders, and the payment providers' signed
//! events that pay for them.
//!
//! * [`orders`]: one row per checkout (`pending` → `paid` | `failed` |
//!   `expired` | `refunded`), read only within the caller's organization.
//! * [`stripe`]: Stripe's webhook signatures and the few event fields the
//!   service reads, apart from any HTTP plumbing.
//!
//! A payment's credits and its order's new status are written in one
//! transaction: the order update rides along the ledger operation as a
//! [`crate::ledger::SideWrite`], guarded so that a concurrent change to the
//! order rolls both back and the provider's retry finds the truth.

pub mod fulfil;
pub mod orders;
pub mod purchase;
pub mod stripe;
pub mod subscriptions;
pub mod webhooks;

/// Creem's webhook signature of `body`: hex HMAC-SHA256 with the secret
/// (Creem signs no timestamp).
pub fn creem_signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
