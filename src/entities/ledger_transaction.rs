//! `ledger_transactions` table. The append-only ledger; `balance_after_micros` is the stored balance right after the row.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq)]
#[sea_orm(table_name = "ledger_transactions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: i64,
    pub seq: i64,
    #[sea_orm(column_name = "type")]
    pub kind: String,
    pub amount_micros: i64,
    pub balance_after_micros: i64,
    pub description: String,
    pub reference_type: Option<String>,
    pub reference_id: Option<String>,
    pub meter: Option<String>,
    pub quantity: Option<i64>,
    pub model: Option<String>,
    pub created_at: DateTimeUtc,
    /// A `Consume`'s row is its idempotency record: the request's
    /// fingerprint (its key is `reference_id`); `None` on every other row.
    pub idempotency_hash: Option<String>,
    /// A `Consume`'s row: the available balance its call answered.
    pub available_after_micros: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
