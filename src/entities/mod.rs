//! sea-orm entities, one per table of `migrations/`. Shapes only: the rules
//! that keep money right live in `ledger/` and the capability modules.

pub mod admin_audit;
pub mod checkin;
pub mod checkin_config;
pub mod coupon;
pub mod coupon_redemption;
pub mod credit_lot;
pub mod idempotency_record;
pub mod ledger_monthly;
pub mod ledger_transaction;
pub mod lot_allocation;
pub mod order;
pub mod organization;
pub mod pack;
pub mod plan;
pub mod rate;
pub mod reservation;
pub mod subscription;
pub mod webhook_event;
