//! Pure types and rules, free of I/O: credit and money amounts, meters and
//! the rate arithmetic.

pub mod meter;
pub mod money;

pub use meter::Meter;
pub use money::{MICROS_PER_CREDIT, cents_to_decimal, micros_to_decimal, parse_credits};

/// A catalog code (plan, coupon) as stored: trimmed, 1 to 64 letters,
/// digits, `_` and `-`, upper-cased, so that codes are unique whatever the
/// case they are typed in. The error names `field`.
pub fn catalog_code(field: &str, value: &str) -> Result<String, crate::error::Error> {
    use crate::error::Error;
    let v = value.trim();
    if v.is_empty() || v.len() > 64 {
        return Err(Error::invalid(field, "must be 1 to 64 characters"));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::invalid(
            field,
            "may hold only letters, digits, `_` and `-`",
        ));
    }
    Ok(v.to_ascii_uppercase())
}
