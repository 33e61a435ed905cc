//! Checks of wire input, each failure naming the field: what is decoded
//! here reaches the services well-formed.

use chrono::{DateTime, Utc};

use crate::{domain::Meter, error::Error, pb};

/// Longest accepted identifier (org ids, keys, codes).
pub const MAX_ID: usize = 255;
/// Longest accepted free text (descriptions, reasons).
pub const MAX_TEXT: usize = 1000;

/// A required, non-blank string of at most `max` characters.
pub fn required(field: &str, value: &str, max: usize) -> Result<String, Error> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    Ok(value.to_owned())
}

/// An optional string: blank counts as absent.
pub fn optional(field: &str, value: Option<&str>, max: usize) -> Result<Option<String>, Error> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => required(field, v, max).map(Some),
    }
}

pub fn meter(field: &str, value: &str) -> Result<Meter, Error> {
    value
        .trim()
        .parse()
        .map_err(|e: String| Error::invalid(field, e))
}

pub fn positive(field: &str, value: i64) -> Result<i64, Error> {
    if value <= 0 {
        return Err(Error::invalid(field, "must be greater than 0"));
    }
    Ok(value)
}

pub fn non_negative(field: &str, value: i64) -> Result<i64, Error> {
    if value < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    Ok(value)
}

/// (limit, offset) of a page: limit 1–100 (default 20), offset >= 0.
pub fn page(page: Option<&pb::PageRequest>) -> Result<(u64, u64), Error> {
    let (limit, offset) = page.map_or((None, 0), |p| (p.limit, p.offset));
    let limit = match limit {
        None => 20,
        Some(l) if (1..=100).contains(&l) => l as u64,
        Some(_) => return Err(Error::invalid("limit", "must be between 1 and 100")),
    };
    if offset < 0 {
        return Err(Error::invalid("offset", "must not be negative"));
    }
    Ok((limit, offset as u64))
}

/// A transaction type filter.
pub fn transaction_type(value: Option<&str>) -> Result<Option<String>, Error> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(t) if crate::ledger::reads::TRANSACTION_TYPES.contains(&t) => Ok(Some(t.to_owned())),
        Some(t) => Err(Error::invalid(
            "type",
            format!(
                "unknown transaction type `{t}` ({})",
                crate::ledger::reads::TRANSACTION_TYPES.join(", ")
            ),
        )),
    }
}

pub fn timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Error> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| Error::invalid(field, "is not a valid timestamp"))
}

/// Longest accepted URL.
pub const MAX_URL: usize = 2048;

/// An optional absolute `http`/`https` URL (a checkout's return address).
pub fn optional_url(field: &str, value: Option<&str>) -> Result<Option<String>, Error> {
    let Some(url) = optional(field, value, MAX_URL)? else {
        return Ok(None);
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !url.chars().any(char::is_whitespace) => Ok(Some(url)),
        _ => Err(Error::invalid(field, "must be an absolute http(s) URL")),
    }
}
