//! PostgreSQL only: `billing_write_conflict(org)`, which raises a
//! serialization failure naming the organization.
//!
//! A batch of usage operations on PostgreSQL may start from the state its
//! writer left an organization in, without loading or locking it, and then
//! writes in one statement that must change nothing if anyone wrote the
//! organization meanwhile: that statement calls this function for a row
//! that no longer holds the expected values, which aborts it. (SQLite has
//! one writer and never needs it.)

use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DbBackend},
};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261203_000002_write_conflict"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        m.get_connection()
            .execute_unprepared(
                "CREATE OR REPLACE FUNCTION billing_write_conflict(org bigint) RETURNS bigint
                 LANGUAGE plpgsql VOLATILE AS $$
                 BEGIN
                   RAISE EXCEPTION 'organization % changed since the batch read it', org
                     USING ERRCODE = '40001';
                 END $$",
            )
            .await
            .map(|_| ())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        m.get_connection()
            .execute_unprepared("DROP FUNCTION IF EXISTS billing_write_conflict(bigint)")
            .await
            .map(|_| ())
    }
}
