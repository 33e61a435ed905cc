//! Idempotency: the fingerprint a replay must match, and the stored answer
//! a replay gets back.

use sha2::{Digest, Sha256};

use super::ops::{Op, Outcome};
use crate::{
    error::{Error, Result},
    ledger::{
        AdjustOutcome, ConsumeOutcome, GrantOutcome, ReserveOutcome, SettleOutcome,
        TakeBackOutcome, VoidOutcome,
    },
};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct IdemKey {
    pub(super) org_id: i64,
    pub(super) method: &'static str,
    pub(super) key: String,
    pub(super) hash: String,
}

/// The fingerprint a replay must match: sha256 over each part preceded by
/// its length, so no two different lists of parts encode alike (a part
/// may contain any byte, NUL included), hex.
pub(super) fn request_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

pub(super) fn replay(op: &Op, response: &str) -> Result<Outcome> {
    let bad =
        |e: serde_json::Error| Error::internal(format!("stored idempotent answer unreadable: {e}"));
    Ok(match op {
        Op::Consume(_) => {
            let mut o: ConsumeOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Consume(o)
        }
        Op::Reserve(_) => {
            let mut o: ReserveOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Reserve(o)
        }
        Op::Adjust(_) => {
            let mut o: AdjustOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Adjust(o)
        }
        Op::Grant(_) => {
            let mut o: GrantOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Grant(o)
        }
        Op::Settle(_) => {
            let mut o: SettleOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Settle(o)
        }
        Op::Void(_) => {
            let mut o: VoidOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::Void(o)
        }
        Op::TakeBack(_) => {
            let mut o: TakeBackOutcome = serde_json::from_str(response).map_err(bad)?;
            o.duplicate = true;
            Outcome::TakeBack(o)
        }
        Op::Commit(_) | Op::Release(_) | Op::Sweep(_) => {
            return Err(Error::internal("operation has no idempotency key"));
        }
    })
}

pub(super) fn stored_response(outcome: &Outcome) -> Result<String> {
    let text = match outcome {
        Outcome::Consume(o) => serde_json::to_string(o),
        Outcome::Reserve(o) => serde_json::to_string(o),
        Outcome::Adjust(o) => serde_json::to_string(o),
        Outcome::Grant(o) => serde_json::to_string(o),
        Outcome::Settle(o) => serde_json::to_string(o),
        Outcome::Void(o) => serde_json::to_string(o),
        Outcome::TakeBack(o) => serde_json::to_string(o),
        Outcome::Commit(_) | Outcome::Release(_) | Outcome::Swept => {
            return Err(Error::internal("operation has no idempotency key"));
        }
    };
    text.map_err(|e| Error::internal(format!("cannot store answer: {e}")))
}
