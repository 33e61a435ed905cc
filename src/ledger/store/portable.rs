//! The batch's rows through sea-orm's query builder: one statement per
//! table. `IN` lists are padded to powers of two so a few statement texts
//! cover every batch size and stay prepared.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{CaseStatement, Expr, ExprTrait, IntoColumnRef, OnConflict},
};

use super::{ConsumeKeyRow, IdemRow, Loaded, NewLot, OrgRow, Rows, SettledLot, SourceRef, Wanted};
use crate::{
    entities::{
        admin_audit, credit_lot, idempotency_record, ledger_monthly, ledger_transaction,
        lot_allocation, organization, reservation,
    },
    ledger::model::HoldStatus,
};

/// `CASE WHEN id = … THEN value … ELSE column END`: a new value per row
/// for a multi-row update.
fn by_id(
    id: impl IntoColumnRef + Copy,
    values: impl IntoIterator<Item = (i64, i64)>,
    column: impl IntoColumnRef,
) -> CaseStatement {
    values
        .into_iter()
        .fold(CaseStatement::new(), |case, (row, value)| {
            case.case(Expr::col(id).eq(row), Expr::val(value))
        })
        .finally(Expr::col(column))
}

/// `values` padded to a power-of-two length by repeating the last one.
fn padded<T: Clone>(mut values: Vec<T>) -> Vec<T> {
    if let Some(last) = values.last().cloned() {
        values.resize(values.len().next_power_of_two(), last);
    }
    values
}

pub(super) async fn lock_and_load(
    txn: &DatabaseTransaction,
    wanted: &Wanted,
) -> Result<(Vec<OrgRow>, Loaded), DbErr> {
    let orgs = lock_orgs(txn, &wanted.org_ids).await?;
    // Holds matter only where credits are held (an org with nothing held
    // has no open hold to expire) or where the batch names one.
    let holding: Vec<i64> = orgs
        .iter()
        .filter(|o| o.held_micros > 0)
        .map(|o| o.id)
        .collect();
    let loaded = load(txn, wanted, holding).await?;
    Ok((orgs, loaded))
}

async fn lock_orgs(txn: &DatabaseTransaction, org_ids: &[i64]) -> Result<Vec<OrgRow>, DbErr> {
    let rows = organization::Entity::find()
        .filter(organization::Column::Id.is_in(padded(org_ids.to_vec())))
        .order_by_asc(organization::Column::Id)
        .lock_exclusive()
        .all(txn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|o| OrgRow {
            id: o.id,
            balance_micros: o.balance_micros,
            held_micros: o.held_micros,
            ledger_seq: o.ledger_seq,
            expected: None,
        })
        .collect())
}

async fn load(
    txn: &DatabaseTransaction,
    wanted: &Wanted,
    holding: Vec<i64>,
) -> Result<Loaded, DbErr> {
    let lots = credit_lot::Entity::find()
        .filter(credit_lot::Column::OrgId.is_in(padded(wanted.org_ids.clone())))
        .filter(credit_lot::Column::RemainingMicros.gt(0))
        .all(txn)
        .await?;
    let holds = if holding.is_empty() && wanted.named_holds.is_empty() {
        Vec::new()
    } else {
        reservation::Entity::find()
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(reservation::Column::OrgId.is_in(padded(holding)))
                            .add(reservation::Column::Status.eq(HoldStatus::Open.as_str()))
                            .add(reservation::Column::ExpiresAt.lte(wanted.now)),
                    )
                    .add(reservation::Column::Id.is_in(padded(wanted.named_holds.clone()))),
            )
            .all(txn)
            .await?
    };
    let mut idempotency = Vec::new();
    if !wanted.keys.is_empty() {
        let orgs: BTreeSet<i64> = wanted.keys.iter().map(|k| k.org_id).collect();
        let methods: BTreeSet<&str> = wanted.keys.iter().map(|k| k.method).collect();
        let keys: Vec<String> = wanted.keys.iter().map(|k| k.key.clone()).collect();
        // All three columns of the unique index, so the lookup is an index
        // probe per key rather than a scan of the organizations' keys.
        let records = idempotency_record::Entity::find()
            .filter(idempotency_record::Column::OrgId.is_in(padded(orgs.into_iter().collect())))
            .filter(idempotency_record::Column::Method.is_in(padded(methods.into_iter().collect())))
            .filter(idempotency_record::Column::Key.is_in(padded(keys)))
            .all(txn)
            .await?;
        idempotency = records
            .into_iter()
            .map(|r| IdemRow {
                org_id: r.org_id,
                method: r.method,
                key: r.key,
                request_hash: r.request_hash,
                response: r.response,
            })
            .collect();
    }
    let consume_keys = consume_keys(txn, wanted).await?;
    let mut sources = BTreeSet::new();
    if !wanted.sources.is_empty() {
        let mut any = Condition::any();
        for SourceRef {
            source_type,
            source_id,
        } in &wanted.sources
        {
            any = any.add(
                Condition::all()
                    .add(credit_lot::Column::SourceType.eq(source_type.as_str()))
                    .add(credit_lot::Column::SourceId.eq(source_id.as_str())),
            );
        }
        for lot in credit_lot::Entity::find().filter(any).all(txn).await? {
            if let Some(id) = lot.source_id {
                sources.insert((lot.source_type, id));
            }
        }
    }
    Ok(Loaded {
        lots,
        holds,
        idempotency,
        consume_keys,
        sources,
    })
}

/// The ledger rows that record the batch's `Consume` keys (an index probe
/// per key: the unique index covers exactly the rows that carry a
/// fingerprint).
async fn consume_keys(
    txn: &DatabaseTransaction,
    wanted: &Wanted,
) -> Result<Vec<ConsumeKeyRow>, DbErr> {
    let (orgs, keys): (BTreeSet<i64>, Vec<String>) = wanted
        .keys
        .iter()
        .filter(|k| k.method == super::CONSUME_METHOD)
        .map(|k| (k.org_id, k.key.clone()))
        .unzip();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let rows = ledger_transaction::Entity::find()
        .filter(ledger_transaction::Column::OrgId.is_in(padded(orgs.into_iter().collect())))
        .filter(ledger_transaction::Column::ReferenceId.is_in(padded(keys)))
        .filter(ledger_transaction::Column::IdempotencyHash.is_not_null())
        .all(txn)
        .await?;
    rows.into_iter()
        .map(
            |r| match (r.reference_id, r.idempotency_hash, r.available_after_micros) {
                (Some(key), Some(request_hash), Some(available_after_micros)) => {
                    Ok(ConsumeKeyRow {
                        org_id: r.org_id,
                        key,
                        request_hash,
                        transaction_id: r.id,
                        charged_micros: -r.amount_micros,
                        available_after_micros,
                    })
                }
                _ => Err(DbErr::Custom(format!(
                    "ledger row {} records a key without its answer",
                    r.id
                ))),
            },
        )
        .collect()
}

pub(super) async fn insert_lots(
    txn: &DatabaseTransaction,
    lots: Vec<NewLot>,
) -> Result<Vec<i64>, DbErr> {
    let mut ids = Vec::with_capacity(lots.len());
    for lot in lots {
        let row = credit_lot::ActiveModel {
            org_id: Set(lot.org_id),
            kind: Set(lot.kind.into()),
            allocated_micros: Set(lot.allocated_micros),
            remaining_micros: Set(lot.remaining_micros),
            expires_at: Set(lot.expires_at),
            source_type: Set(lot.source_type),
            source_id: Set(lot.source_id),
            created_at: Set(lot.created_at),
            ..Default::default()
        }
        .insert(txn)
        .await?;
        ids.push(row.id);
    }
    Ok(ids)
}

pub(super) async fn insert_audits(
    txn: &impl ConnectionTrait,
    audits: Vec<admin_audit::ActiveModel>,
) -> Result<(), DbErr> {
    if !audits.is_empty() {
        admin_audit::Entity::insert_many(audits)
            .exec_without_returning(txn)
            .await?;
    }
    Ok(())
}

/// Pending lots that settled: their new kind and expiry (rare, so one
/// statement per lot on both backends).
pub(super) async fn settle_lots(
    txn: &impl ConnectionTrait,
    settled: &[SettledLot],
) -> Result<(), DbErr> {
    for lot in settled {
        credit_lot::Entity::update_many()
            .col_expr(credit_lot::Column::Kind, Expr::value(lot.kind))
            .col_expr(credit_lot::Column::ExpiresAt, Expr::value(lot.expires_at))
            .filter(credit_lot::Column::Id.eq(lot.id))
            .exec(txn)
            .await?;
    }
    Ok(())
}

pub(super) async fn write(
    txn: &impl ConnectionTrait,
    rows: Rows,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    if !rows.lot_updates.is_empty() {
        let remaining = by_id(
            credit_lot::Column::Id,
            rows.lot_updates.iter().map(|u| (u.id, u.remaining_micros)),
            credit_lot::Column::RemainingMicros,
        );
        credit_lot::Entity::update_many()
            .col_expr(credit_lot::Column::RemainingMicros, remaining.into())
            .filter(credit_lot::Column::Id.is_in(rows.lot_updates.iter().map(|u| u.id)))
            .exec(txn)
            .await?;
    }
    if !rows.entries.is_empty() {
        ledger_transaction::Entity::insert_many(
            rows.entries
                .into_iter()
                .map(IntoActiveModel::into_active_model),
        )
        .exec_without_returning(txn)
        .await?;
    }
    if !rows.allocations.is_empty() {
        lot_allocation::Entity::insert_many(rows.allocations.into_iter().map(|a| {
            lot_allocation::ActiveModel {
                transaction_id: Set(a.transaction_id),
                lot_id: Set(a.lot_id),
                amount_micros: Set(a.amount_micros),
            }
        }))
        .exec_without_returning(txn)
        .await?;
    }
    if !rows.monthly.is_empty() {
        ledger_monthly::Entity::insert_many(rows.monthly.into_iter().map(|m| {
            ledger_monthly::ActiveModel {
                org_id: Set(m.org_id),
                month: Set(m.month),
                kind: Set(m.kind.into()),
                credit_micros: Set(m.credit_micros),
                debit_micros: Set(m.debit_micros),
            }
        }))
        .on_conflict(
            OnConflict::columns([
                ledger_monthly::Column::OrgId,
                ledger_monthly::Column::Month,
                ledger_monthly::Column::Kind,
            ])
            .value(
                ledger_monthly::Column::CreditMicros,
                Expr::cust(super::saturating_sum(
                    "ledger_monthly.credit_micros",
                    "excluded.credit_micros",
                )),
            )
            .value(
                ledger_monthly::Column::DebitMicros,
                Expr::cust(super::saturating_sum(
                    "ledger_monthly.debit_micros",
                    "excluded.debit_micros",
                )),
            )
            .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    }
    for h in rows.finished_holds {
        reservation::Entity::update_many()
            .col_expr(reservation::Column::Status, Expr::val(h.status))
            .col_expr(reservation::Column::FinishedAt, Expr::val(now))
            .col_expr(
                reservation::Column::TransactionId,
                Expr::val(h.transaction_id),
            )
            .col_expr(
                reservation::Column::ChargedMicros,
                Expr::val(h.charged_micros),
            )
            .filter(reservation::Column::Id.eq(h.id))
            .exec(txn)
            .await?;
    }
    if !rows.new_holds.is_empty() {
        reservation::Entity::insert_many(
            rows.new_holds
                .into_iter()
                .map(IntoActiveModel::into_active_model),
        )
        .exec_without_returning(txn)
        .await?;
    }
    if !rows.idempotency.is_empty() {
        idempotency_record::Entity::insert_many(rows.idempotency.into_iter().map(|r| {
            idempotency_record::ActiveModel {
                org_id: Set(r.org_id),
                method: Set(r.method),
                key: Set(r.key),
                request_hash: Set(r.request_hash),
                response: Set(r.response),
                created_at: Set(now),
            }
        }))
        .exec_without_returning(txn)
        .await?;
    }
    if !rows.orgs.is_empty() {
        let case = |value: fn(&OrgRow) -> i64, column: organization::Column| {
            by_id(
                organization::Column::Id,
                rows.orgs.iter().map(|o| (o.id, value(o))),
                column,
            )
        };
        organization::Entity::update_many()
            .col_expr(
                organization::Column::BalanceMicros,
                case(|o| o.balance_micros, organization::Column::BalanceMicros).into(),
            )
            .col_expr(
                organization::Column::HeldMicros,
                case(|o| o.held_micros, organization::Column::HeldMicros).into(),
            )
            .col_expr(
                organization::Column::LedgerSeq,
                case(|o| o.ledger_seq, organization::Column::LedgerSeq).into(),
            )
            .col_expr(organization::Column::UpdatedAt, Expr::val(now))
            .filter(organization::Column::Id.is_in(rows.orgs.iter().map(|o| o.id)))
            .exec(txn)
            .await?;
    }
    Ok(())
}
