//! Schema migrations for the billing service.
//!
//! One migration set that runs unchanged on SQLite (the embedded default) and
//! PostgreSQL: only portable column types, constraints written with sea-query
//! so each backend gets its own dialect (the PostgreSQL-only parts,
//! the `write_conflict` helper function, the `C` collation of the ledger's
//! text keys and the triggers that keep the ledger append-only, are no-ops
//! on SQLite). Migrations are append-only: a change
//! to the schema is a new `m<date>_<what>.rs`, never an edit of a shipped one.

pub use sea_orm_migration::prelude::*;

mod m20261121_000001_initial_schema;
mod m20261203_000001_hold_outcome;
mod m20261203_000002_write_conflict;
mod m20261203_000003_subscription_payments;
mod m20261204_000001_redemption_per_order;
mod m20261206_000001_key_collation;
mod m20261207_000001_natural_keys;
mod m20261207_000002_consume_keys;
mod m20261207_000003_ledger_guards;

pub struct Migrator;

/// Runs the statements written for the connection's backend: `postgres` or
/// `sqlite`, each possibly several statements (or none: an empty text).
/// Any other backend is refused, not guessed.
async fn by_backend(m: &SchemaManager<'_>, postgres: &str, sqlite: &str) -> Result<(), DbErr> {
    use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};
    let sql = match m.get_database_backend() {
        DbBackend::Postgres => postgres,
        DbBackend::Sqlite => sqlite,
        // The enum is non-exhaustive: anything else is refused.
        _ => {
            return Err(DbErr::Migration(
                "the billing service runs on SQLite or PostgreSQL only".into(),
            ));
        }
    };
    if !sql.trim().is_empty() {
        m.get_connection().execute_unprepared(sql).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_initial_schema::Migration),
            Box::new(m20261203_000001_hold_outcome::Migration),
            Box::new(m20261203_000002_write_conflict::Migration),
            Box::new(m20261203_000003_subscription_payments::Migration),
            Box::new(m20261204_000001_redemption_per_order::Migration),
            Box::new(m20261206_000001_key_collation::Migration),
            Box::new(m20261207_000001_natural_keys::Migration),
            Box::new(m20261207_000002_consume_keys::Migration),
            Box::new(m20261207_000003_ledger_guards::Migration),
        ]
    }
}
