//! Pure types and rules, free of I/O: credit and money amounts, meters and
//! the rate arithmetic.

pub mod meter;
pub mod money;

pub use meter::Meter;
pub use money::{MICROS_PER_CREDIT, cents_to_decimal, micros_to_decimal, parse_credits};
