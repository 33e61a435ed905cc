//! What a committed hold charged, and an index to prune old idempotency
//! records by age.
//!
//! A Commit or Release of a finished hold answers how it finished; for a
//! commit that includes the amount charged, kept on the hold itself so the
//! answer needs no second lookup.

use sea_orm_migration::{prelude::*, schema::*};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261203_000001_hold_outcome"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Reservations::Table)
                .add_column(big_integer_null(Reservations::ChargedMicros))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_idempotency_created")
                .table(IdempotencyRecords::Table)
                .col(IdempotencyRecords::CreatedAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("ix_idempotency_created")
                .table(IdempotencyRecords::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Reservations::Table)
                .drop_column(Reservations::ChargedMicros)
                .to_owned(),
        )
        .await
    }
}

#[derive(DeriveIden)]
enum Reservations {
    Table,
    ChargedMicros,
}

#[derive(DeriveIden)]
enum IdempotencyRecords {
    Table,
    CreatedAt,
}
