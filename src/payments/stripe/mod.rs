//! Stripe: the API client ([`client`]), webhook signatures ([`signature`])
//! and the event fields the service reads ([`events`]).

pub mod client;
pub mod events;
pub mod signature;

pub use client::Stripe;
