//! A `Consume`'s ledger row is its own idempotency record.
//!
//! Every `Consume` writes exactly one ledger row, which already names its
//! key (`reference_type = 'idempotency_key'`, `reference_id` = the key).
//! A separate idempotency record repeated that row's facts: its answer is
//! the row's id, its charge (minus its amount) and the available balance
//! right after it. Two columns on the row carry what the record added:
//!
//! * `idempotency_hash`: the request's fingerprint, which a replay must
//!   match; set on exactly the rows that are a `Consume`'s record;
//! * `available_after_micros`: the available balance the call answered
//!   (stored balance less what was held at the time).
//!
//! A unique index over `(org_id, reference_id)` of those rows keeps one
//! row per organization and key, as the records' primary key did for
//! `(org, 'consume', key)`. The row, its index entry and its foreign key
//! check replace a second row with two index entries and a second foreign
//! key check per call.
//!
//! Records written before this migration stay where they are, are still
//! honoured by every lookup, and age out with the retention of the other
//! methods' records. On PostgreSQL a trigger guards a rolling upgrade:
//! a replica of the previous release, which only knows the records table,
//! cannot record (and so cannot charge) a `Consume` key that a ledger row
//! already holds; its write fails instead. The down migration writes every
//! such key back as a record, so none is forgotten.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261207_000002_consume_keys"
    }
}

const POSTGRES_UP: &str = r#"
ALTER TABLE ledger_transactions ADD COLUMN idempotency_hash text;
ALTER TABLE ledger_transactions ADD COLUMN available_after_micros bigint;
CREATE UNIQUE INDEX uq_ledger_consume_key
    ON ledger_transactions (org_id, reference_id COLLATE "C")
 WHERE idempotency_hash IS NOT NULL;
CREATE FUNCTION billing_consume_key_taken() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM ledger_transactions t
              WHERE t.org_id = NEW.org_id
                AND t.reference_id COLLATE "C" = NEW.key
                AND t.idempotency_hash IS NOT NULL) THEN
    RAISE EXCEPTION 'Consume key % of organization % is already recorded on its ledger row',
      NEW.key, NEW.org_id USING ERRCODE = 'unique_violation';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER billing_consume_key_taken
  BEFORE INSERT ON idempotency_records
  FOR EACH ROW WHEN (NEW.method = 'consume')
  EXECUTE FUNCTION billing_consume_key_taken();
"#;

const POSTGRES_DOWN: &str = r#"
DROP TRIGGER billing_consume_key_taken ON idempotency_records;
DROP FUNCTION billing_consume_key_taken();
INSERT INTO idempotency_records (org_id, method, key, request_hash, response, created_at)
SELECT org_id, 'consume', reference_id, idempotency_hash,
       json_build_object('transaction_id', id, 'charged_micros', -amount_micros,
                         'balance_micros', available_after_micros)::text,
       created_at
  FROM ledger_transactions
 WHERE idempotency_hash IS NOT NULL
ON CONFLICT DO NOTHING;
DROP INDEX uq_ledger_consume_key;
ALTER TABLE ledger_transactions DROP COLUMN available_after_micros;
ALTER TABLE ledger_transactions DROP COLUMN idempotency_hash;
"#;

const SQLITE_UP: &str = r#"
ALTER TABLE ledger_transactions ADD COLUMN idempotency_hash text;
ALTER TABLE ledger_transactions ADD COLUMN available_after_micros integer;
CREATE UNIQUE INDEX uq_ledger_consume_key
    ON ledger_transactions (org_id, reference_id)
 WHERE idempotency_hash IS NOT NULL;
"#;

const SQLITE_DOWN: &str = r#"
INSERT OR IGNORE INTO idempotency_records (org_id, method, key, request_hash, response, created_at)
SELECT org_id, 'consume', reference_id, idempotency_hash,
       json_object('transaction_id', id, 'charged_micros', -amount_micros,
                   'balance_micros', available_after_micros),
       created_at
  FROM ledger_transactions
 WHERE idempotency_hash IS NOT NULL;
DROP INDEX uq_ledger_consume_key;
ALTER TABLE ledger_transactions DROP COLUMN available_after_micros;
ALTER TABLE ledger_transactions DROP COLUMN idempotency_hash;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        crate::by_backend(m, POSTGRES_UP, SQLITE_UP).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        crate::by_backend(m, POSTGRES_DOWN, SQLITE_DOWN).await
    }
}
