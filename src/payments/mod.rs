//! How credits are bought: orders, and the payment providers' signed
//! events that pay for them.
//!
//! * [`orders`]: one row per checkout (`pending` → `paid` | `failed` |
//!   `expired` | `refunded`), read only within the caller's organization.
//! * [`purchase`]: pack purchases and their rules, subscription
//!   checkouts, through either provider.
//! * [`subscriptions`]: subscriptions as the providers report them, and
//!   the credits each paid period brings.
//! * [`fulfil`]: what a payment event does to an order and its credits.
//! * [`webhooks`]: signed provider events in, each effect exactly once.
//! * [`stripe`], [`creem`]: each provider's client and wire types, apart.
//!
//! A payment's credits and its order's new status are written in one
//! transaction: the order update rides along the ledger operation as a
//! [`crate::ledger::SideWrite`], guarded so that a concurrent change to the
//! order rolls both back and the provider's retry finds the truth.

pub mod creem;
pub mod fulfil;
pub mod orders;
pub mod purchase;
pub mod stripe;
pub mod subscriptions;
pub mod webhooks;
