//! The ledger invariants of CONTRACT §5, checked straight from the database.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};

use billing::entities::{
    credit_lot, ledger_monthly, ledger_transaction, lot_allocation, organization, reservation,
};
use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, EntityTrait, QueryOrder};

/// Panics with a description of the first broken invariant. `now` is the
/// time after the last sweep: no live lot may be expired with credits left.
pub async fn check(db: &DatabaseConnection, now: DateTime<Utc>) {
    let orgs = organization::Entity::find().all(db).await.unwrap();
    let lots = credit_lot::Entity::find().all(db).await.unwrap();
    let txs = ledger_transaction::Entity::find()
        .order_by_asc(ledger_transaction::Column::OrgId)
        .order_by_asc(ledger_transaction::Column::Seq)
        .all(db)
        .await
        .unwrap();
    let allocations = lot_allocation::Entity::find().all(db).await.unwrap();
    let holds = reservation::Entity::find().all(db).await.unwrap();
    check_monthly(db, &txs).await;

    // No orphans: on PostgreSQL the ledger's write statement checks these
    // parents instead of foreign keys.
    let org_ids: HashSet<i64> = orgs.iter().map(|o| o.id).collect();
    let tx_ids: HashSet<&str> = txs.iter().map(|t| t.id.as_str()).collect();
    let lot_ids: HashSet<i64> = lots.iter().map(|l| l.id).collect();
    for t in &txs {
        assert!(
            org_ids.contains(&t.org_id),
            "ledger row {} of a missing organization {}",
            t.id,
            t.org_id
        );
    }
    for a in &allocations {
        assert!(
            tx_ids.contains(a.transaction_id.as_str()),
            "allocation to lot {} of a missing ledger row {}",
            a.lot_id,
            a.transaction_id
        );
        assert!(
            lot_ids.contains(&a.lot_id),
            "allocation of ledger row {} to a missing lot {}",
            a.transaction_id,
            a.lot_id
        );
    }

    let mut alloc_by_tx: HashMap<&str, i64> = HashMap::new();
    let mut alloc_by_lot: HashMap<i64, i64> = HashMap::new();
    for a in &allocations {
        *alloc_by_tx.entry(a.transaction_id.as_str()).or_default() += a.amount_micros;
        *alloc_by_lot.entry(a.lot_id).or_default() += a.amount_micros;
    }
    for lot in &lots {
        assert!(lot.remaining_micros >= 0, "lot {} below zero", lot.id);
        assert!(
            lot.remaining_micros <= lot.allocated_micros,
            "lot {} above its allocation",
            lot.id
        );
        if lot.kind != "pending" {
            assert_eq!(
                alloc_by_lot.get(&lot.id).copied().unwrap_or(0),
                lot.remaining_micros,
                "lot {}: allocations do not add up to its remaining credits",
                lot.id
            );
        }
    }
    for org in &orgs {
        let org_txs: Vec<_> = txs.iter().filter(|t| t.org_id == org.id).collect();
        let mut running = 0i64;
        for (i, t) in org_txs.iter().enumerate() {
            assert_eq!(
                t.seq,
                i as i64 + 1,
                "org {}: ledger sequence has a gap at {}",
                org.external_id,
                t.seq
            );
            running += t.amount_micros;
            assert_eq!(
                t.balance_after_micros, running,
                "org {}: balance_after of {} is off",
                org.external_id, t.id
            );
            assert_eq!(
                alloc_by_tx.get(t.id.as_str()).copied().unwrap_or(0),
                t.amount_micros,
                "transaction {}: per-lot allocations do not add up",
                t.id
            );
            // A row that records a `Consume`'s key carries the whole first
            // answer: the key, and an available balance the row allowed.
            if t.idempotency_hash.is_some() {
                assert_eq!(t.reference_type.as_deref(), Some("idempotency_key"));
                assert!(t.reference_id.is_some(), "transaction {}: no key", t.id);
                let available = t.available_after_micros.unwrap_or(-1);
                assert!(
                    (0..=t.balance_after_micros).contains(&available),
                    "transaction {}: available after {available} outside its balance",
                    t.id
                );
            } else {
                assert_eq!(t.available_after_micros, None, "transaction {}", t.id);
            }
        }
        assert_eq!(
            org.ledger_seq,
            org_txs.len() as i64,
            "org {}: ledger_seq",
            org.external_id
        );
        assert_eq!(
            org.balance_micros, running,
            "org {}: balance != Σ ledger",
            org.external_id
        );
        let live: i64 = lots
            .iter()
            .filter(|l| l.org_id == org.id && l.kind != "pending")
            .map(|l| {
                assert!(
                    l.remaining_micros == 0 || l.expires_at.is_none_or(|at| at > now),
                    "org {}: lot {} expired with credits left after a sweep",
                    org.external_id,
                    l.id
                );
                l.remaining_micros
            })
            .sum();
        assert_eq!(
            org.balance_micros, live,
            "org {}: balance != Σ remaining of live lots",
            org.external_id
        );
        let open: i64 = holds
            .iter()
            .filter(|h| h.org_id == org.id && h.status == "open")
            .map(|h| h.held_micros)
            .sum();
        assert_eq!(
            org.held_micros, open,
            "org {}: held != Σ open holds",
            org.external_id
        );
        assert!(org.balance_micros >= 0 && org.held_micros >= 0);
    }
}

/// Ledger rows per organization external id.
pub async fn rows_by_org(
    db: &DatabaseConnection,
) -> HashMap<String, Vec<ledger_transaction::Model>> {
    let names: HashMap<i64, String> = organization::Entity::find()
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.id, o.external_id))
        .collect();
    let mut out: HashMap<String, Vec<ledger_transaction::Model>> = HashMap::new();
    for t in ledger_transaction::Entity::find()
        .order_by_asc(ledger_transaction::Column::Seq)
        .all(db)
        .await
        .unwrap()
    {
        out.entry(names[&t.org_id].clone()).or_default().push(t);
    }
    out
}

/// `ledger_monthly` holds, per organization, month and bucket, the sums of
/// the ledger rows' credits and debits. A row's bucket is its type, except
/// a committed hold (`reservation`), summed as usage of its meter.
async fn check_monthly(db: &DatabaseConnection, txs: &[ledger_transaction::Model]) {
    let mut expected: HashMap<(i64, String, String), (i64, i64)> = HashMap::new();
    for t in txs {
        let bucket = match (t.kind.as_str(), t.meter.as_deref()) {
            ("reservation", Some("ai_tokens")) => "ai_usage".to_owned(),
            ("reservation", Some("storage_egress")) => "storage_egress".to_owned(),
            (kind, _) => kind.to_owned(),
        };
        let month = t.created_at.format("%Y-%m").to_string();
        let sums = expected.entry((t.org_id, month, bucket)).or_default();
        if t.amount_micros >= 0 {
            sums.0 += t.amount_micros;
        } else {
            sums.1 -= t.amount_micros;
        }
    }
    let stored: HashMap<(i64, String, String), (i64, i64)> = ledger_monthly::Entity::find()
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.credit_micros != 0 || m.debit_micros != 0)
        .map(|m| {
            (
                (m.org_id, m.month, m.kind),
                (m.credit_micros, m.debit_micros),
            )
        })
        .collect();
    expected.retain(|_, sums| *sums != (0, 0));
    assert_eq!(
        stored, expected,
        "ledger_monthly != sums of the ledger rows"
    );
}
