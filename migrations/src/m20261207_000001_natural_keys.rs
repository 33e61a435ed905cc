//! Lot allocations and idempotency records are keyed by what identifies
//! them, not by a surrogate number.
//!
//! A ledger row moves credits into or out of a lot at most once, so
//! `(transaction_id, lot_id)` names an allocation; an idempotency record is
//! the one answer to `(org_id, method, key)`, already unique. Nothing ever
//! looked either up by its `id`. Each `Consume` writes one row of each, and
//! the surrogate cost an index entry and a sequence step per row: the
//! natural key becomes the primary key and replaces the index that led with
//! the same columns (`ix_lot_allocations_transaction`,
//! `uq_idempotency_org_method_key`). Measured: about 10 % less PostgreSQL
//! CPU per `Consume` (see the README).
//!
//! PostgreSQL drops the column (its sequence goes with it) and adds the
//! key in place. SQLite cannot change a primary key, so each table is
//! rebuilt as a `WITHOUT ROWID` table clustered on its key (both have small
//! rows, the case SQLite recommends it for), copied, and renamed; no other
//! table references them. Existing rows are kept; a database whose rows
//! already broke the key's uniqueness fails the migration rather than
//! losing one.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261207_000001_natural_keys"
    }
}

const POSTGRES_UP: &str = r#"
ALTER TABLE lot_allocations DROP COLUMN id;
ALTER TABLE lot_allocations ADD PRIMARY KEY (transaction_id, lot_id);
DROP INDEX ix_lot_allocations_transaction;
ALTER TABLE idempotency_records DROP COLUMN id;
ALTER TABLE idempotency_records ADD PRIMARY KEY (org_id, method, key);
DROP INDEX uq_idempotency_org_method_key;
"#;

const POSTGRES_DOWN: &str = r#"
ALTER TABLE lot_allocations DROP CONSTRAINT lot_allocations_pkey;
ALTER TABLE lot_allocations ADD COLUMN id bigserial PRIMARY KEY;
CREATE INDEX ix_lot_allocations_transaction ON lot_allocations (transaction_id);
ALTER TABLE idempotency_records DROP CONSTRAINT idempotency_records_pkey;
ALTER TABLE idempotency_records ADD COLUMN id bigserial PRIMARY KEY;
CREATE UNIQUE INDEX uq_idempotency_org_method_key ON idempotency_records (org_id, method, key);
"#;

/// The columns every version of each table has, and their foreign keys,
/// as the first migration wrote them.
const ALLOCATION_COLUMNS: &str = r#"
  "transaction_id" varchar(36) NOT NULL,
  "lot_id" integer NOT NULL,
  "amount_micros" integer NOT NULL,"#;
const ALLOCATION_KEYS: &str = r#"
  FOREIGN KEY ("transaction_id") REFERENCES "ledger_transactions" ("id") ON DELETE RESTRICT ON UPDATE RESTRICT,
  FOREIGN KEY ("lot_id") REFERENCES "credit_lots" ("id") ON DELETE RESTRICT ON UPDATE RESTRICT"#;
const ALLOCATION_COPIED: &str = r#""transaction_id", "lot_id", "amount_micros""#;
const IDEMPOTENCY_COLUMNS: &str = r#"
  "org_id" integer NOT NULL,
  "method" varchar(64) NOT NULL,
  "key" varchar(255) NOT NULL,
  "request_hash" varchar(64) NOT NULL,
  "response" text NOT NULL,
  "created_at" timestamp_with_timezone_text NOT NULL,"#;
const IDEMPOTENCY_KEYS: &str = r#"
  FOREIGN KEY ("org_id") REFERENCES "organizations" ("id") ON DELETE RESTRICT ON UPDATE RESTRICT"#;
const IDEMPOTENCY_COPIED: &str =
    r#""org_id", "method", "key", "request_hash", "response", "created_at""#;

/// SQLite's way to change a table's key: create `body` as a new table,
/// copy the `copied` columns over, drop the old one, take its name.
fn rebuild(table: &str, body: &str, options: &str, copied: &str) -> String {
    format!(
        r#"
CREATE TABLE "{table}_rebuilt" ({body}
){options};
INSERT INTO "{table}_rebuilt" ({copied}) SELECT {copied} FROM "{table}";
DROP TABLE "{table}";
ALTER TABLE "{table}_rebuilt" RENAME TO "{table}";"#
    )
}

fn sqlite_up() -> String {
    let allocations = rebuild(
        "lot_allocations",
        &format!(
            r#"{ALLOCATION_COLUMNS}
  PRIMARY KEY ("transaction_id", "lot_id"),{ALLOCATION_KEYS}"#
        ),
        " WITHOUT ROWID",
        ALLOCATION_COPIED,
    );
    let idempotency = rebuild(
        "idempotency_records",
        &format!(
            r#"{IDEMPOTENCY_COLUMNS}
  PRIMARY KEY ("org_id", "method", "key"),{IDEMPOTENCY_KEYS}"#
        ),
        " WITHOUT ROWID",
        IDEMPOTENCY_COPIED,
    );
    format!(
        r#"{allocations}
CREATE INDEX "ix_lot_allocations_lot" ON "lot_allocations" ("lot_id");
{idempotency}
CREATE INDEX "ix_idempotency_created" ON "idempotency_records" ("created_at");
"#
    )
}

fn sqlite_down() -> String {
    const ID: &str = r#"
  "id" integer NOT NULL PRIMARY KEY AUTOINCREMENT,"#;
    let allocations = rebuild(
        "lot_allocations",
        &format!("{ID}{ALLOCATION_COLUMNS}{ALLOCATION_KEYS}"),
        "",
        ALLOCATION_COPIED,
    );
    let idempotency = rebuild(
        "idempotency_records",
        &format!("{ID}{IDEMPOTENCY_COLUMNS}{IDEMPOTENCY_KEYS}"),
        "",
        IDEMPOTENCY_COPIED,
    );
    format!(
        r#"{allocations}
CREATE INDEX "ix_lot_allocations_transaction" ON "lot_allocations" ("transaction_id");
CREATE INDEX "ix_lot_allocations_lot" ON "lot_allocations" ("lot_id");
{idempotency}
CREATE UNIQUE INDEX "uq_idempotency_org_method_key" ON "idempotency_records" ("org_id", "method", "key");
CREATE INDEX "ix_idempotency_created" ON "idempotency_records" ("created_at");
"#
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        crate::by_backend(m, POSTGRES_UP, &sqlite_up()).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        crate::by_backend(m, POSTGRES_DOWN, &sqlite_down()).await
    }
}
