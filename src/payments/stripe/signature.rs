//! Stripe's webhook signature: the `Stripe-Signature` header carries
//! `t=<unix seconds>` and one or more `v1=<hex>` entries (several while a
//! secret is being rolled), each an HMAC-SHA256 of `"{t}.{raw body}"` keyed
//! with the endpoint secret (`whsec_…`, the whole string). An event is
//! accepted when any `v1` matches, compared in constant time, and `t` is
//! within [`TOLERANCE_SECS`] of now, either way. Other schemes (`v0`) are
//! ignored.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::Error;

/// How far the signed timestamp may be from now, in seconds.
pub const TOLERANCE_SECS: i64 = 300;

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value Stripe would send for `body` at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let t = timestamp.to_string();
    let digest = mac(secret.as_bytes(), &t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(digest))
}

/// Checks `header` against `body`; INVALID_SIGNATURE saying what is wrong.
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64) -> Result<(), Error> {
    let bad = |why: &str| Error::InvalidSignature(why.to_owned());
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" => timestamp = Some(value),
            "v1" => candidates.push(value),
            _ => {}
        }
    }
    let t = timestamp.ok_or_else(|| bad("no timestamp (t=) in Stripe-Signature"))?;
    let seconds: i64 = t
        .parse()
        .map_err(|_| bad("the timestamp (t=) is not a number"))?;
    if candidates.is_empty() {
        return Err(bad("no v1 signature in Stripe-Signature"));
    }
    if (now - seconds).abs() > TOLERANCE_SECS {
        return Err(bad("the timestamp is outside the 300 s tolerance"));
    }
    let expected = mac(secret.as_bytes(), t, body).finalize().into_bytes();
    let matched = candidates.iter().fold(false, |found, candidate| {
        let ok = hex::decode(candidate)
            .map(|given| bool::from(given.as_slice().ct_eq(expected.as_slice())))
            .unwrap_or(false);
        found | ok
    });
    if matched {
        Ok(())
    } else {
        Err(bad("no v1 signature matches"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test";
    const BODY: &[u8] = br#"{"id":"evt_1"}"#;

    fn reason(r: Result<(), Error>) -> String {
        match r {
            Err(Error::InvalidSignature(why)) => why,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn a_signature_made_by_sign_verifies_within_tolerance() {
        let header = sign(SECRET, 1_000, BODY);
        assert!(verify(SECRET, &header, BODY, 1_000).is_ok());
        assert!(verify(SECRET, &header, BODY, 1_300).is_ok());
        assert!(
            verify(SECRET, &header, BODY, 700).is_ok(),
            "clock skew both ways"
        );
        assert!(reason(verify(SECRET, &header, BODY, 1_301)).contains("tolerance"));
        assert!(reason(verify(SECRET, &header, BODY, 699)).contains("tolerance"));
    }

    #[test]
    fn any_v1_entry_may_match_while_a_secret_rolls() {
        let old = sign("whsec_old", 1_000, BODY);
        let new = sign(SECRET, 1_000, BODY);
        let v1 = |h: &str| {
            h.split_once(",v1=")
                .map(|(_, s)| s.to_owned())
                .unwrap_or_default()
        };
        let both = format!("t=1000,v1={},v0=ignored,v1={}", v1(&new), v1(&old));
        assert!(verify(SECRET, &both, BODY, 1_000).is_ok());
        assert!(verify("whsec_old", &both, BODY, 1_000).is_ok());
        assert!(reason(verify("whsec_other", &both, BODY, 1_000)).contains("matches"));
    }

    #[test]
    fn malformed_headers_and_changed_bodies_are_refused() {
        let header = sign(SECRET, 1_000, BODY);
        assert!(reason(verify(SECRET, &header, b"{}", 1_000)).contains("matches"));
        assert!(reason(verify(SECRET, "", BODY, 1_000)).contains("timestamp"));
        assert!(reason(verify(SECRET, "t=abc,v1=00", BODY, 1_000)).contains("number"));
        assert!(reason(verify(SECRET, "t=1000", BODY, 1_000)).contains("no v1"));
        assert!(reason(verify(SECRET, "t=1000,v1=zz", BODY, 1_000)).contains("matches"));
    }
}
