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
pub mod webhooks;
