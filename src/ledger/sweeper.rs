//! The background expiry sweep.
//!
//! Writers sweep their own organizations before anything else, and readers
//! never count expired lots or holds, so this task is what turns the expired
//! credits of quiet organizations into `expiry` ledger rows (and releases
//! their expired holds). It finds them with two indexed queries and hands
//! each organization to the ledger as an ordinary write.

use std::{collections::BTreeSet, time::Duration};

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use tokio_util::sync::CancellationToken;

use super::{Ledger, model::LotKind};
use crate::{
    entities::{credit_lot, reservation},
    error::Result,
};

/// How often quiet organizations are swept.
pub const INTERVAL: Duration = Duration::from_secs(5);

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
            .filter(reservation::Column::ExpiresAt.lte(now))
            .into_tuple::<i64>()
            .all(db)
            .await?,
    );
    for org in &orgs {
        ledger.sweep_org(*org).await?;
    }
    Ok(orgs.len())
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
        }
    });
}
