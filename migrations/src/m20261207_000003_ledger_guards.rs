//! PostgreSQL only: the ledger is append-only and what it refers to is
//! never deleted, guarded by triggers instead of per-row foreign-key
//! checks on its two hottest tables.
//!
//! Every `Consume` inserts one ledger row and at least one lot allocation.
//! Their three foreign keys (ledger row → organization, allocation →
//! ledger row, allocation → lot) each ran a query of their own per
//! inserted row, about a fifth of PostgreSQL's CPU per call. They are
//! replaced by two guarantees that together leave no way to an orphan row
//! through the service:
//!
//! * **Nothing a ledger row refers to ever goes away.** Ledger rows and lot
//!   allocations are never updated, deleted or truncated (the ledger is
//!   append-only); organizations and credit lots are never deleted or
//!   truncated and their ids never change. Triggers refuse each of these
//!   with `restrict_violation`. They cost nothing on the service's own
//!   writes, which never do any of it. (Before, a row without children
//!   could be deleted; a billing system keeps its customers' records.)
//! * **The statement that writes ledger rows checks their parents itself**
//!   and aborts whole if one is missing (`billing_missing_parent` raises
//!   `foreign_key_violation`): each row's organization exists, each
//!   allocation's ledger row is one the same statement inserts, and each
//!   allocation's lot exists. These checks are lookups inside that one
//!   statement, not a query per row. As nothing can be deleted, a parent
//!   seen once stays.
//!
//! What the database no longer refuses is an `INSERT` written by hand,
//! outside the service, that names a missing parent. The service's other
//! rules of the ledger (balances, sequence numbers, allocations summing to
//! their row) were never the database's to check either.
//!
//! SQLite keeps its foreign keys: it has one writer, and the checks are
//! cheap there.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261207_000003_ledger_guards"
    }
}

const POSTGRES_UP: &str = r#"
CREATE FUNCTION billing_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% on % is refused: %', TG_OP, TG_TABLE_NAME, TG_ARGV[0]
    USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER billing_append_only
  BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_transactions
  FOR EACH STATEMENT EXECUTE FUNCTION billing_refuse_change('the ledger is append-only');
CREATE TRIGGER billing_append_only
  BEFORE UPDATE OR DELETE OR TRUNCATE ON lot_allocations
  FOR EACH STATEMENT EXECUTE FUNCTION billing_refuse_change('the ledger is append-only');
CREATE TRIGGER billing_kept
  BEFORE DELETE OR TRUNCATE ON organizations
  FOR EACH STATEMENT EXECUTE FUNCTION billing_refuse_change('ledger rows refer to organizations');
CREATE TRIGGER billing_kept
  BEFORE DELETE OR TRUNCATE ON credit_lots
  FOR EACH STATEMENT EXECUTE FUNCTION billing_refuse_change('lot allocations refer to credit lots');
CREATE TRIGGER billing_id_kept
  BEFORE UPDATE OF id ON organizations
  FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
  EXECUTE FUNCTION billing_refuse_change('ledger rows refer to organizations by id');
CREATE TRIGGER billing_id_kept
  BEFORE UPDATE OF id ON credit_lots
  FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
  EXECUTE FUNCTION billing_refuse_change('lot allocations refer to credit lots by id');
CREATE FUNCTION billing_missing_parent(what text, id anyelement) RETURNS anyelement
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RAISE EXCEPTION 'the ledger write refers to % %, which does not exist', what, id
    USING ERRCODE = 'foreign_key_violation';
END $$;
ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_org_id_fkey;
ALTER TABLE lot_allocations DROP CONSTRAINT lot_allocations_transaction_id_fkey;
ALTER TABLE lot_allocations DROP CONSTRAINT lot_allocations_lot_id_fkey;
"#;

const POSTGRES_DOWN: &str = r#"
ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_org_id_fkey
  FOREIGN KEY (org_id) REFERENCES organizations (id) ON UPDATE RESTRICT ON DELETE RESTRICT;
ALTER TABLE lot_allocations ADD CONSTRAINT lot_allocations_transaction_id_fkey
  FOREIGN KEY (transaction_id) REFERENCES ledger_transactions (id) ON UPDATE RESTRICT ON DELETE RESTRICT;
ALTER TABLE lot_allocations ADD CONSTRAINT lot_allocations_lot_id_fkey
  FOREIGN KEY (lot_id) REFERENCES credit_lots (id) ON UPDATE RESTRICT ON DELETE RESTRICT;
DROP FUNCTION billing_missing_parent(text, anyelement);
DROP TRIGGER billing_id_kept ON credit_lots;
DROP TRIGGER billing_id_kept ON organizations;
DROP TRIGGER billing_kept ON credit_lots;
DROP TRIGGER billing_kept ON organizations;
DROP TRIGGER billing_append_only ON lot_allocations;
DROP TRIGGER billing_append_only ON ledger_transactions;
DROP FUNCTION billing_refuse_change();
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        crate::by_backend(m, POSTGRES_UP, "").await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        crate::by_backend(m, POSTGRES_DOWN, "").await
    }
}
