//! The background expiry sweep.
//!
//! Writers sweep their own organizations before anything else, and readers
//! never count expired lots or holds, so this task is what turns the expired
//! credits of quiet organizations into `expiry` ledger rows (and releases
//! their expired holds). It finds them with two indexed queries and hands
//! each organization to the ledger as an ordinary write. An organization
//! whose sweep fails is logged and skipped until the next round; the
//! others are still swept. Holds of zero credits hold nothing and are left
//! to expire by the clock alone (reads never count them), so they never
//! keep this task busy.
//!
//! It also prunes idempotency records older than [`IDEMPOTENCY_RETENTION`]:
//! a key replayed after that long is a new request. (A `Consume`'s key is
//! recorded on its ledger row instead, and kept with it.)

use std::{collections::BTreeSet, time::Duration};

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio_util::sync::CancellationToken;

use super::{Ledger, model::LotKind};
use crate::{
    entities::{credit_lot, idempotency_record, reservation},
    error::Result,
};

/// How often quiet organizations are swept.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// How long an idempotency key is remembered (7 days).
pub const IDEMPOTENCY_RETENTION: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// Records deleted per statement, so pruning never holds a long write.
const PRUNE_CHUNK: u64 = 1000;

/// Sweeps every organization that has expired credits or holds now.
/// Returns how many organizations were swept.
pub async fn sweep_all(ledger: &Ledger) -> Result<usize> {
    let now = ledger.now();
    let db = ledger.db();
    let mut orgs: BTreeSet<i64> = credit_lot::Entity::find()
        .select_only()
        .column(credit_lot::Column::OrgId)
        .distinct()
        .filter(credit_lot::Column::RemainingMicros.gt(0))
        .filter(credit_lot::Column::Kind.ne(LotKind::Pending.as_str()))
        .filter(credit_lot::Column::ExpiresAt.lte(now))
        .into_tuple::<i64>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    orgs.extend(
        reservation::Entity::find()
            .select_only()
            .column(reservation::Column::OrgId)
            .distinct()
            .filter(reservation::Column::Status.eq("open"))
            .filter(reservation::Column::HeldMicros.gt(0))
            .filter(reservation::Column::ExpiresAt.lte(now))
            .into_tuple::<i64>()
            .all(db)
            .await?,
    );
    let mut swept = 0;
    for org in &orgs {
        match ledger.sweep_org(*org).await {
            Ok(()) => swept += 1,
            Err(e) => tracing::warn!(org_id = org, error = %e, "could not sweep organization"),
        }
    }
    Ok(swept)
}

/// Deletes idempotency records older than [`IDEMPOTENCY_RETENTION`], about
/// a chunk at a time, oldest first. Returns how many were deleted.
///
/// Records are keyed by what they answer, so a chunk is bounded by age:
/// each round deletes up to the creation time of the [`PRUNE_CHUNK`]th
/// oldest expired record (and any written in the same instant, one batch
/// at most), and the last round deletes what is left.
pub async fn prune_idempotency(ledger: &Ledger) -> Result<u64> {
    use idempotency_record::Column::CreatedAt;
    let cutoff = ledger.now() - IDEMPOTENCY_RETENTION;
    let db = ledger.db();
    let mut deleted = 0;
    loop {
        let bound: Option<chrono::DateTime<chrono::Utc>> = idempotency_record::Entity::find()
            .select_only()
            .column(CreatedAt)
            .filter(CreatedAt.lt(cutoff))
            .order_by_asc(CreatedAt)
            .offset(PRUNE_CHUNK - 1)
            .limit(1)
            .into_tuple()
            .one(db)
            .await?;
        let chunk = match bound {
            Some(t) => CreatedAt.lte(t),
            None => CreatedAt.lt(cutoff),
        };
        deleted += idempotency_record::Entity::delete_many()
            .filter(chunk)
            .exec(db)
            .await?
            .rows_affected;
        if bound.is_none() {
            return Ok(deleted);
        }
    }
}

/// Runs [`sweep_all`] every [`INTERVAL`] until `shutdown`.
pub fn spawn(ledger: Ledger, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(INTERVAL) => {}
            }
            match sweep_all(&ledger).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(organizations = n, "booked expired credits and holds"),
                Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
            }
            match prune_idempotency(&ledger).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "pruned old idempotency records"),
                Err(e) => tracing::warn!(error = %e, "idempotency pruning failed"),
            }
        }
    });
}
