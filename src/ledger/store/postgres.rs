//! The batch's rows on PostgreSQL: three statements of fixed text, rows in
//! and out as JSON.
//!
//! Each statement is prepared once per connection and planned once
//! (`jsonb_to_recordset` and `ANY(ARRAY(…))` give the planner the same
//! shape whatever the batch holds), and a batch costs the same five round
//! trips whether it carries one operation or two hundred. The load runs
//! after the lock, as its own statement, so it reads a snapshot taken once
//! the locks are held: nothing another transaction committed under those
//! locks can be missed.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, Value};
use serde_json::json;

use super::{IdemRow, Loaded, OrgRow, Rows, Wanted};
use crate::entities::{credit_lot, reservation};

const LOCK: &str = "\
SELECT id, balance_micros, held_micros, ledger_seq FROM organizations \
WHERE id = ANY (ARRAY(SELECT value::bigint FROM jsonb_array_elements_text($1))) \
ORDER BY id FOR UPDATE";

const LOAD: &str = r#"
SELECT
  (SELECT coalesce(json_agg(l), '[]')::text FROM credit_lots l
    WHERE l.org_id = ANY (ARRAY(SELECT value::bigint FROM jsonb_array_elements_text($1)))
      AND l.remaining_micros > 0 AND l.kind <> 'pending') AS lots,
  (SELECT coalesce(json_agg(h), '[]')::text FROM (
      SELECT r.* FROM reservations r
       WHERE r.id = ANY (ARRAY(SELECT value FROM jsonb_array_elements_text($2)))
      UNION
      SELECT r.* FROM reservations r
       WHERE r.org_id = ANY (ARRAY(SELECT value::bigint FROM jsonb_array_elements_text($3)))
         AND r.status = 'open' AND r.expires_at <= $4) h) AS holds,
  (SELECT coalesce(json_agg(json_build_array(r.org_id, r.method, r.key, r.request_hash, r.response)), '[]')::text
     FROM jsonb_to_recordset($5) AS k(org_id bigint, method text, key text),
     LATERAL (SELECT i.* FROM idempotency_records i
               WHERE i.org_id = k.org_id AND i.method = k.method AND i.key = k.key
               LIMIT 1) r) AS idempotency,
  (SELECT coalesce(json_agg(json_build_array(c.source_type, c.source_id)), '[]')::text
     FROM jsonb_to_recordset($6) AS s(source_type text, source_id text),
     LATERAL (SELECT l.source_type, l.source_id FROM credit_lots l
               WHERE l.source_type = s.source_type AND l.source_id = s.source_id
               LIMIT 1) c) AS sources
"#;

const WRITE: &str = r#"
WITH
lot_updates AS (
  UPDATE credit_lots AS c SET remaining_micros = x.remaining_micros
    FROM jsonb_to_recordset($1) AS x(id bigint, remaining_micros bigint)
   WHERE c.id = x.id),
entries AS (
  INSERT INTO ledger_transactions (id, org_id, seq, "type", amount_micros, balance_after_micros,
                                   description, reference_type, reference_id, meter, quantity,
                                   model, created_at)
  SELECT x.id, x.org_id, x.seq, x."type", x.amount_micros, x.balance_after_micros,
         x.description, x.reference_type, x.reference_id, x.meter, x.quantity, x.model,
         x.created_at
    FROM jsonb_to_recordset($2) AS x(id text, org_id bigint, seq bigint, "type" text,
                                     amount_micros bigint, balance_after_micros bigint,
                                     description text, reference_type text, reference_id text,
                                     meter text, quantity bigint, model text,
                                     created_at timestamptz)),
allocations AS (
  INSERT INTO lot_allocations (transaction_id, lot_id, amount_micros)
  SELECT x.transaction_id, x.lot_id, x.amount_micros
    FROM jsonb_to_recordset($3) AS x(transaction_id text, lot_id bigint, amount_micros bigint)),
monthly AS (
  INSERT INTO ledger_monthly AS m (org_id, month, "type", credit_micros, debit_micros)
  SELECT x.org_id, x.month, x."type", x.credit_micros, x.debit_micros
    FROM jsonb_to_recordset($4) AS x(org_id bigint, month text, "type" text,
                                     credit_micros bigint, debit_micros bigint)
  ON CONFLICT (org_id, month, "type") DO UPDATE
     SET credit_micros = m.credit_micros + excluded.credit_micros,
         debit_micros = m.debit_micros + excluded.debit_micros),
finished_holds AS (
  UPDATE reservations AS r
     SET status = x.status, transaction_id = x.transaction_id, finished_at = $9
    FROM jsonb_to_recordset($5) AS x(id text, status text, transaction_id text)
   WHERE r.id = x.id),
new_holds AS (
  INSERT INTO reservations (id, org_id, held_micros, status, meter, quantity, model,
                            transaction_id, expires_at, created_at, finished_at)
  SELECT x.id, x.org_id, x.held_micros, x.status, x.meter, x.quantity, x.model,
         x.transaction_id, x.expires_at, x.created_at, x.finished_at
    FROM jsonb_to_recordset($6) AS x(id text, org_id bigint, held_micros bigint, status text,
                                     meter text, quantity bigint, model text,
                                     transaction_id text, expires_at timestamptz,
                                     created_at timestamptz, finished_at timestamptz)),
idempotency AS (
  INSERT INTO idempotency_records (org_id, method, key, request_hash, response, created_at)
  SELECT x.org_id, x.method, x.key, x.request_hash, x.response, $9
    FROM jsonb_to_recordset($7) AS x(org_id bigint, method text, key text,
                                     request_hash text, response text)),
orgs AS (
  UPDATE organizations AS o
     SET balance_micros = x.balance_micros, held_micros = x.held_micros,
         ledger_seq = x.ledger_seq, updated_at = $9
    FROM jsonb_to_recordset($8) AS x(id bigint, balance_micros bigint, held_micros bigint,
                                     ledger_seq bigint)
   WHERE o.id = x.id)
SELECT 1
"#;

/// A timestamp as PostgreSQL stores it: microseconds (truncated, as the
/// driver's binary encoding does), UTC.
fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn json_param(v: serde_json::Value) -> Value {
    Value::from(v)
}

fn statement(sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, DbErr> {
    serde_json::from_str(text).map_err(|e| DbErr::Custom(format!("cannot read {what}: {e}")))
}

pub(super) async fn lock_orgs(
    txn: &DatabaseTransaction,
    org_ids: &[i64],
) -> Result<Vec<OrgRow>, DbErr> {
    let rows = txn
        .query_all_raw(statement(LOCK, vec![json_param(json!(org_ids))]))
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok(OrgRow {
                id: row.try_get("", "id")?,
                balance_micros: row.try_get("", "balance_micros")?,
                held_micros: row.try_get("", "held_micros")?,
                ledger_seq: row.try_get("", "ledger_seq")?,
            })
        })
        .collect()
}

pub(super) async fn load(txn: &DatabaseTransaction, wanted: &Wanted) -> Result<Loaded, DbErr> {
    let keys: Vec<serde_json::Value> = wanted
        .keys
        .iter()
        .map(|(org_id, method, key)| json!({"org_id": org_id, "method": method, "key": key}))
        .collect();
    let sources: Vec<serde_json::Value> = wanted
        .sources
        .iter()
        .map(|(t, id)| json!({"source_type": t, "source_id": id}))
        .collect();
    let row = txn
        .query_one_raw(statement(
            LOAD,
            vec![
                json_param(json!(wanted.org_ids)),
                json_param(json!(wanted.named_holds)),
                json_param(json!(wanted.holding)),
                wanted.now.into(),
                json_param(serde_json::Value::Array(keys)),
                json_param(serde_json::Value::Array(sources)),
            ],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("the load statement returned no row".into()))?;
    let text = |col: &str| row.try_get::<String>("", col);
    let lots: Vec<credit_lot::Model> = decode("lots", &text("lots")?)?;
    let holds: Vec<reservation::Model> = decode("holds", &text("holds")?)?;
    let idempotency: Vec<(i64, String, String, String, String)> =
        decode("idempotency records", &text("idempotency")?)?;
    let sources: BTreeSet<(String, String)> = decode("lot sources", &text("sources")?)?;
    Ok(Loaded {
        lots,
        holds,
        idempotency: idempotency
            .into_iter()
            .map(|(org_id, method, key, request_hash, response)| IdemRow {
                org_id,
                method,
                key,
                request_hash,
                response,
            })
            .collect(),
        sources,
    })
}

pub(super) async fn write(
    txn: &DatabaseTransaction,
    rows: Rows,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    if !rows.audits.is_empty() {
        // Admin writes only: the portable insert is fine.
        use sea_orm::EntityTrait;
        crate::entities::admin_audit::Entity::insert_many(rows.audits)
            .exec_without_returning(txn)
            .await?;
    }
    let lot_updates: Vec<_> = rows
        .lot_updates
        .iter()
        .map(|(id, remaining)| json!({"id": id, "remaining_micros": remaining}))
        .collect();
    let entries: Vec<_> = rows
        .entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "org_id": e.org_id, "seq": e.seq, "type": e.kind,
                "amount_micros": e.amount_micros, "balance_after_micros": e.balance_after_micros,
                "description": e.description, "reference_type": e.reference_type,
                "reference_id": e.reference_id, "meter": e.meter, "quantity": e.quantity,
                "model": e.model, "created_at": ts(&e.created_at),
            })
        })
        .collect();
    let allocations: Vec<_> = rows
        .allocations
        .iter()
        .map(
            |(t, lot, amount)| json!({"transaction_id": t, "lot_id": lot, "amount_micros": amount}),
        )
        .collect();
    let monthly: Vec<_> = rows
        .monthly
        .iter()
        .map(|m| {
            json!({
                "org_id": m.org_id, "month": m.month, "type": m.kind,
                "credit_micros": m.credit_micros, "debit_micros": m.debit_micros,
            })
        })
        .collect();
    let finished: Vec<_> = rows
        .finished_holds
        .iter()
        .map(|h| json!({"id": h.id, "status": h.status, "transaction_id": h.transaction_id}))
        .collect();
    let new_holds: Vec<_> = rows
        .new_holds
        .iter()
        .map(|h| {
            json!({
                "id": h.id, "org_id": h.org_id, "held_micros": h.held_micros, "status": h.status,
                "meter": h.meter, "quantity": h.quantity, "model": h.model,
                "transaction_id": h.transaction_id, "expires_at": ts(&h.expires_at),
                "created_at": ts(&h.created_at), "finished_at": h.finished_at.as_ref().map(ts),
            })
        })
        .collect();
    let idempotency: Vec<_> = rows
        .idempotency
        .iter()
        .map(|r| {
            json!({
                "org_id": r.org_id, "method": r.method, "key": r.key,
                "request_hash": r.request_hash, "response": r.response,
            })
        })
        .collect();
    let orgs: Vec<_> = rows
        .orgs
        .iter()
        .map(|o| {
            json!({
                "id": o.id, "balance_micros": o.balance_micros, "held_micros": o.held_micros,
                "ledger_seq": o.ledger_seq,
            })
        })
        .collect();
    let values = [
        lot_updates,
        entries,
        allocations,
        monthly,
        finished,
        new_holds,
        idempotency,
        orgs,
    ]
    .into_iter()
    .map(|rows| json_param(serde_json::Value::Array(rows)))
    .chain([now.into()])
    .collect();
    txn.execute_raw(statement(WRITE, values)).await?;
    Ok(())
}
