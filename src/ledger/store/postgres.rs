//! The batch's rows on PostgreSQL: two statements of fixed text, rows in
//! and out as JSON.
//!
//! The write statement checks the parents of the ledger rows it inserts
//! (each row's organization, each allocation's ledger row and lot) and
//! aborts whole if one is missing: the database has no per-row foreign
//! keys on those two tables, and refuses instead to delete or re-key
//! anything they refer to (migration `ledger_guards`).
//!
//! Each statement is prepared once per connection and planned once
//! (`json_to_recordset` and `ANY(ARRAY(…))` give the planner the same
//! shape whatever the batch holds), and a batch costs the same four round
//! trips whether it carries one operation or two hundred: `BEGIN`, lock and
//! load, write, `COMMIT`.
//!
//! Locking and loading in one statement needs care. Under READ COMMITTED a
//! statement reads one snapshot, taken before its row locks are granted;
//! `FOR UPDATE` hands back the newest version of each organization row, but
//! the lots, holds and keys read beside it come from that snapshot. If
//! another transaction committed changes to an organization between the
//! snapshot and the lock, those reads would be stale. Every ledger write
//! updates its organizations' rows (see `changed_rows` in the engine), so
//! such a commit always leaves a newer row version: the statement compares
//! the locked version with the one its snapshot sees (`xmin` and
//! `ledger_seq`), and when any differs runs the statement once more: its
//! locks are already held then, so the new snapshot misses nothing.

use chrono::{DateTime, SecondsFormat, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, Value};
use serde::Serialize;

use super::{ConsumeKeyRow, IdemRow, Loaded, OrgRow, Rows, Wanted};
use crate::entities::{credit_lot, reservation};

const LOCK_AND_LOAD: &str = r#"
SELECT o.id, o.balance_micros, o.held_micros, o.ledger_seq,
  (SELECT s.xmin = o.xmin AND s.ledger_seq = o.ledger_seq
     FROM organizations s WHERE s.id = o.id) AS fresh,
  (SELECT coalesce(json_agg(l), '[]')::text FROM credit_lots l
    WHERE l.org_id = o.id AND l.remaining_micros > 0) AS lots,
  (SELECT coalesce(json_agg(h), '[]')::text FROM (
      SELECT r.* FROM reservations r
       WHERE r.id = ANY (ARRAY(SELECT value FROM json_array_elements_text($2::json)))
         AND r.org_id = o.id
      UNION
      SELECT r.* FROM reservations r
       WHERE o.held_micros > 0 AND r.org_id = o.id
         AND r.status = 'open' AND r.expires_at <= $3) h) AS holds,
  (SELECT coalesce(json_agg(json_build_array(r.org_id, r.method, r.key, r.request_hash, r.response)), '[]')::text
     FROM json_to_recordset($4::json) AS k(org_id bigint, method text, key text),
     LATERAL (SELECT i.* FROM idempotency_records i
               WHERE i.org_id = k.org_id AND i.method = k.method AND i.key = k.key
               LIMIT 1) r
    WHERE k.org_id = o.id) AS idempotency,
  (SELECT coalesce(json_agg(json_build_object(
            'org_id', t.org_id, 'key', t.reference_id, 'request_hash', t.idempotency_hash,
            'transaction_id', t.id, 'charged_micros', -t.amount_micros,
            'available_after_micros', t.available_after_micros)), '[]')::text
     FROM json_to_recordset($4::json) AS k(org_id bigint, method text, key text),
     LATERAL (SELECT t.* FROM ledger_transactions t
               WHERE t.org_id = k.org_id AND t.reference_id COLLATE "C" = k.key
                 AND t.idempotency_hash IS NOT NULL
               LIMIT 1) t
    WHERE k.org_id = o.id AND k.method = 'consume') AS consume_keys,
  (SELECT coalesce(json_agg(json_build_array(c.source_type, c.source_id)), '[]')::text
     FROM json_to_recordset($5::json) AS s(source_type text, source_id text),
     LATERAL (SELECT l.source_type, l.source_id FROM credit_lots l
               WHERE l.source_type = s.source_type AND l.source_id = s.source_id
               LIMIT 1) c) AS sources
FROM organizations o
WHERE o.id = ANY (ARRAY(SELECT value::bigint FROM json_array_elements_text($1::json)))
ORDER BY o.id
FOR UPDATE OF o
"#;

const WRITE: &str = r#"
WITH
lot_updates AS (
  UPDATE credit_lots AS c SET remaining_micros = x.remaining_micros
    FROM json_to_recordset($1::json) AS x(id bigint, remaining_micros bigint)
   WHERE c.id = x.id),
entries AS (
  INSERT INTO ledger_transactions (id, org_id, seq, "type", amount_micros, balance_after_micros,
                                   description, reference_type, reference_id, meter, quantity,
                                   model, created_at, idempotency_hash, available_after_micros)
  SELECT x.id,
         CASE WHEN EXISTS (SELECT 1 FROM organizations o WHERE o.id = x.org_id) THEN x.org_id
              ELSE billing_missing_parent('organization', x.org_id) END,
         x.seq, x."type", x.amount_micros, x.balance_after_micros,
         x.description, x.reference_type, x.reference_id, x.meter, x.quantity, x.model,
         x.created_at, x.idempotency_hash, x.available_after_micros
    FROM json_to_recordset($2::json) AS x(id text, org_id bigint, seq bigint, "type" text,
                                     amount_micros bigint, balance_after_micros bigint,
                                     description text, reference_type text, reference_id text,
                                     meter text, quantity bigint, model text,
                                     created_at timestamptz, idempotency_hash text,
                                     available_after_micros bigint)
  RETURNING id),
allocations AS (
  INSERT INTO lot_allocations (transaction_id, lot_id, amount_micros)
  SELECT CASE WHEN x.transaction_id IN (SELECT id FROM entries) THEN x.transaction_id
              ELSE billing_missing_parent('ledger transaction', x.transaction_id) END,
         CASE WHEN EXISTS (SELECT 1 FROM credit_lots c WHERE c.id = x.lot_id) THEN x.lot_id
              ELSE billing_missing_parent('credit lot', x.lot_id) END,
         x.amount_micros
    FROM json_to_recordset($3::json) AS x(transaction_id text, lot_id bigint, amount_micros bigint)),
monthly AS (
  INSERT INTO ledger_monthly AS m (org_id, month, "type", credit_micros, debit_micros)
  SELECT x.org_id, x.month, x."type", x.credit_micros, x.debit_micros
    FROM json_to_recordset($4::json) AS x(org_id bigint, month text, "type" text,
                                     credit_micros bigint, debit_micros bigint)
  ON CONFLICT (org_id, month, "type") DO UPDATE
     SET credit_micros = CASE WHEN m.credit_micros > 9223372036854775807 - excluded.credit_micros
                              THEN 9223372036854775807
                              ELSE m.credit_micros + excluded.credit_micros END,
         debit_micros = CASE WHEN m.debit_micros > 9223372036854775807 - excluded.debit_micros
                             THEN 9223372036854775807
                             ELSE m.debit_micros + excluded.debit_micros END),
finished_holds AS (
  UPDATE reservations AS r
     SET status = x.status, transaction_id = x.transaction_id,
         charged_micros = x.charged_micros, finished_at = $9
    FROM json_to_recordset($5::json) AS x(id text, status text, transaction_id text,
                                     charged_micros bigint)
   WHERE r.id = x.id),
new_holds AS (
  INSERT INTO reservations (id, org_id, held_micros, status, meter, quantity, model,
                            transaction_id, expires_at, created_at, finished_at,
                            charged_micros)
  SELECT x.id, x.org_id, x.held_micros, x.status, x.meter, x.quantity, x.model,
         x.transaction_id, x.expires_at, x.created_at, x.finished_at, x.charged_micros
    FROM json_to_recordset($6::json) AS x(id text, org_id bigint, held_micros bigint, status text,
                                     meter text, quantity bigint, model text,
                                     transaction_id text, expires_at timestamptz,
                                     created_at timestamptz, finished_at timestamptz,
                                     charged_micros bigint)),
idempotency AS (
  INSERT INTO idempotency_records (org_id, method, key, request_hash, response, created_at)
  SELECT x.org_id, x.method, x.key, x.request_hash, x.response, $9
    FROM json_to_recordset($7::json) AS x(org_id bigint, method text, key text,
                                     request_hash text, response text))
-- The organizations last and as the statement itself: data-modifying CTEs
-- that nothing references run after it, so the write locks its
-- organizations before their lots, as the locking path does. A row that
-- no longer holds the expected values (an unlocked batch's; see
-- `store::Expected`) aborts the whole statement. So does an unlocked
-- batch's `Consume` key that an idempotency record holds ($10: a record
-- from before ledger rows recorded `Consume` keys, or from a replica of
-- that release during a rolling upgrade); the locked path then replays it.
UPDATE organizations AS o
   SET balance_micros = CASE WHEN x.expected_seq IS NULL
                               OR (o.ledger_seq = x.expected_seq
                                   AND o.balance_micros = x.expected_balance
                                   AND o.held_micros = x.expected_held
                                   AND NOT EXISTS (
                                     SELECT 1 FROM json_to_recordset($10::json) AS k(org_id bigint, key text)
                                       JOIN idempotency_records i
                                         ON i.org_id = k.org_id AND i.method = 'consume'
                                        AND i.key = k.key
                                      WHERE k.org_id = o.id))
                             THEN x.balance_micros
                             ELSE billing_write_conflict(o.id) END,
       held_micros = x.held_micros, ledger_seq = x.ledger_seq, updated_at = $9
  FROM json_to_recordset($8::json) AS x(id bigint, balance_micros bigint, held_micros bigint,
                                   ledger_seq bigint, expected_balance bigint,
                                   expected_held bigint, expected_seq bigint)
 WHERE o.id = x.id
"#;

/// A timestamp as PostgreSQL stores it: microseconds (truncated, as the
/// driver's binary encoding does), UTC.
fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `rows` as a JSON text parameter (the statement casts it to `json`).
fn json_param<T: Serialize + ?Sized>(rows: &T) -> Result<Value, DbErr> {
    serde_json::to_string(rows)
        .map(Value::from)
        .map_err(|e| DbErr::Custom(format!("cannot encode rows: {e}")))
}

// Ledger rows and new holds carry timestamps, sent truncated by [`ts`];
// every other row of [`Rows`] is serialized as it is.

#[derive(Serialize)]
struct EntryJson<'a> {
    id: &'a str,
    org_id: i64,
    seq: i64,
    #[serde(rename = "type")]
    kind: &'a str,
    amount_micros: i64,
    balance_after_micros: i64,
    description: &'a str,
    reference_type: Option<&'a str>,
    reference_id: Option<&'a str>,
    meter: Option<&'a str>,
    quantity: Option<i64>,
    model: Option<&'a str>,
    created_at: String,
    idempotency_hash: Option<&'a str>,
    available_after_micros: Option<i64>,
}

/// A `Consume` key an unlocked batch records on its ledger row.
#[derive(Serialize)]
struct KeyJson<'a> {
    org_id: i64,
    key: &'a str,
}

#[derive(Serialize)]
struct HoldJson<'a> {
    id: &'a str,
    org_id: i64,
    held_micros: i64,
    status: &'a str,
    meter: Option<&'a str>,
    quantity: Option<i64>,
    model: Option<&'a str>,
    transaction_id: Option<&'a str>,
    expires_at: String,
    created_at: String,
    finished_at: Option<String>,
    charged_micros: Option<i64>,
}

fn statement(sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, DbErr> {
    serde_json::from_str(text).map_err(|e| DbErr::Custom(format!("cannot read {what}: {e}")))
}

pub(super) async fn lock_and_load(
    txn: &DatabaseTransaction,
    wanted: &Wanted,
) -> Result<(Vec<OrgRow>, Loaded), DbErr> {
    let params = || -> Result<Vec<Value>, DbErr> {
        Ok(vec![
            json_param(&wanted.org_ids)?,
            json_param(&wanted.named_holds)?,
            wanted.now.into(),
            json_param(&wanted.keys)?,
            json_param(&wanted.sources)?,
        ])
    };
    // The second run holds every lock before its snapshot is taken, so no
    // commit can race it: a third is never needed.
    for _ in 0..2 {
        if let Some(found) = try_lock_and_load(txn, params()?).await? {
            return Ok(found);
        }
        tracing::debug!("organization changed while locking; loading again");
    }
    Err(DbErr::Custom(
        "organization rows changed while their locks were held".into(),
    ))
}

/// One run of [`LOCK_AND_LOAD`]; `None` when a locked row is newer than
/// the statement's snapshot (what was read beside it may be stale).
async fn try_lock_and_load(
    txn: &DatabaseTransaction,
    values: Vec<Value>,
) -> Result<Option<(Vec<OrgRow>, Loaded)>, DbErr> {
    let rows = txn.query_all_raw(statement(LOCK_AND_LOAD, values)).await?;
    let mut orgs = Vec::with_capacity(rows.len());
    let mut loaded = Loaded::default();
    for (n, row) in rows.iter().enumerate() {
        if row.try_get::<Option<bool>>("", "fresh")? != Some(true) {
            return Ok(None);
        }
        orgs.push(OrgRow {
            id: row.try_get("", "id")?,
            balance_micros: row.try_get("", "balance_micros")?,
            held_micros: row.try_get("", "held_micros")?,
            ledger_seq: row.try_get("", "ledger_seq")?,
            expected: None,
        });
        let text = |col: &str| row.try_get::<String>("", col);
        loaded
            .lots
            .extend(decode::<Vec<credit_lot::Model>>("lots", &text("lots")?)?);
        loaded
            .holds
            .extend(decode::<Vec<reservation::Model>>("holds", &text("holds")?)?);
        loaded.idempotency.extend(idem_rows(&text("idempotency")?)?);
        loaded.consume_keys.extend(decode::<Vec<ConsumeKeyRow>>(
            "Consume keys",
            &text("consume_keys")?,
        )?);
        if n == 0 {
            loaded.sources = decode("lot sources", &text("sources")?)?;
        }
    }
    Ok(Some((orgs, loaded)))
}

fn idem_rows(text: &str) -> Result<Vec<IdemRow>, DbErr> {
    let rows: Vec<(i64, String, String, String, String)> = decode("idempotency records", text)?;
    Ok(rows
        .into_iter()
        .map(|(org_id, method, key, request_hash, response)| IdemRow {
            org_id,
            method,
            key,
            request_hash,
            response,
        })
        .collect())
}

pub(super) async fn write(
    txn: &impl ConnectionTrait,
    rows: Rows,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let entries: Vec<EntryJson> = rows
        .entries
        .iter()
        .map(|e| EntryJson {
            id: &e.id,
            org_id: e.org_id,
            seq: e.seq,
            kind: &e.kind,
            amount_micros: e.amount_micros,
            balance_after_micros: e.balance_after_micros,
            description: &e.description,
            reference_type: e.reference_type.as_deref(),
            reference_id: e.reference_id.as_deref(),
            meter: e.meter.as_deref(),
            quantity: e.quantity,
            model: e.model.as_deref(),
            created_at: ts(&e.created_at),
            idempotency_hash: e.idempotency_hash.as_deref(),
            available_after_micros: e.available_after_micros,
        })
        .collect();
    // A locked batch looked its keys up under the lock; an unlocked one
    // has them checked against the records table by the statement itself.
    let unlocked = rows.orgs.iter().any(|o| o.expected.is_some());
    let unlocked_keys: Vec<KeyJson> = rows
        .entries
        .iter()
        .filter(|e| unlocked && e.idempotency_hash.is_some())
        .filter_map(|e| {
            Some(KeyJson {
                org_id: e.org_id,
                key: e.reference_id.as_deref()?,
            })
        })
        .collect();
    let new_holds: Vec<HoldJson> = rows
        .new_holds
        .iter()
        .map(|h| HoldJson {
            id: &h.id,
            org_id: h.org_id,
            held_micros: h.held_micros,
            status: &h.status,
            meter: h.meter.as_deref(),
            quantity: h.quantity,
            model: h.model.as_deref(),
            transaction_id: h.transaction_id.as_deref(),
            expires_at: ts(&h.expires_at),
            created_at: ts(&h.created_at),
            finished_at: h.finished_at.as_ref().map(ts),
            charged_micros: h.charged_micros,
        })
        .collect();
    let values = vec![
        json_param(&rows.lot_updates)?,
        json_param(&entries)?,
        json_param(&rows.allocations)?,
        json_param(&rows.monthly)?,
        json_param(&rows.finished_holds)?,
        json_param(&new_holds)?,
        json_param(&rows.idempotency)?,
        json_param(&rows.orgs)?,
        now.into(),
        json_param(&unlocked_keys)?,
    ];
    txn.execute_raw(statement(WRITE, values)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sea_orm::{Database, TransactionTrait};

    use super::*;
    use crate::entities::ledger_transaction;

    fn entry(id: &str, org_id: i64) -> ledger_transaction::Model {
        ledger_transaction::Model {
            id: id.into(),
            org_id,
            seq: 1,
            kind: "manual".into(),
            amount_micros: 5,
            balance_after_micros: 5,
            description: "test".into(),
            reference_type: None,
            reference_id: None,
            meter: None,
            quantity: None,
            model: None,
            created_at: Utc::now(),
            idempotency_hash: None,
            available_after_micros: None,
        }
    }

    /// The write statement refuses, whole, a ledger row of a missing
    /// organization and an allocation of a missing ledger row or lot: the
    /// checks that stand in for the two tables' foreign keys. Needs
    /// PostgreSQL (`TEST_DATABASE_URL`); without it there is nothing to run
    /// the statement on.
    #[tokio::test]
    async fn the_write_refuses_rows_whose_parents_are_missing() -> Result<(), DbErr> {
        let Some(admin_url) = std::env::var("TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            return Ok(());
        };
        let name = format!("billing_u_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&admin_url).await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        let db = crate::db::connect(&crate::db::sibling_database_url(&admin_url, &name)).await?;
        crate::db::migrate(&db).await?;
        let org: i64 = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "INSERT INTO organizations (external_id, created_at, updated_at) \
                 VALUES ('acme', now(), now()) RETURNING id",
            ))
            .await?
            .ok_or_else(|| DbErr::Custom("no organization row".into()))?
            .try_get("", "id")?;

        let now = Utc::now();
        let cases: [(&str, Rows); 3] = [
            (
                "organization",
                Rows {
                    entries: vec![entry("t-no-org", org + 1000)],
                    ..Rows::default()
                },
            ),
            (
                "ledger transaction",
                Rows {
                    allocations: vec![super::super::Allocation {
                        transaction_id: "t-missing".into(),
                        lot_id: 1,
                        amount_micros: 5,
                    }],
                    ..Rows::default()
                },
            ),
            (
                "credit lot",
                Rows {
                    entries: vec![entry("t-no-lot", org)],
                    allocations: vec![super::super::Allocation {
                        transaction_id: "t-no-lot".into(),
                        lot_id: 424_242,
                        amount_micros: 5,
                    }],
                    ..Rows::default()
                },
            ),
        ];
        for (missing, rows) in cases {
            let txn = db.begin().await?;
            let refused = write(&txn, rows, now)
                .await
                .expect_err("a row whose parent is missing");
            txn.rollback().await?;
            assert_eq!(
                crate::db::sqlstate(&refused).as_deref(),
                Some("23503"),
                "{refused}"
            );
            assert!(
                refused
                    .to_string()
                    .contains(&format!("refers to {missing}")),
                "{refused}"
            );
        }
        let written = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT (SELECT count(*) FROM ledger_transactions) + (SELECT count(*) FROM lot_allocations) AS n",
            ))
            .await?
            .map(|row| row.try_get::<i64>("", "n"))
            .transpose()?;
        assert_eq!(written, Some(0), "nothing was written");
        db.close().await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
            .await?;
        admin.close().await?;
        Ok(())
    }
}
