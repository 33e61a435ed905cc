//! Code generated from `proto/billing/v1/*.proto` by `build.rs`.

#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]

tonic::include_proto!("billing.v1");

/// The encoded descriptor set of every billing proto, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("billing_descriptor");
