//! Creem: a small typed HTTPS client ([`client`]), webhook signatures
//! ([`signature`]), and the wire types of its requests, answers and
//! webhook events ([`wire`]), each apart.

pub mod client;
pub mod signature;
pub mod wire;

pub use client::Creem;
