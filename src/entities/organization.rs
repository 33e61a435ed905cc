//! `organizations` table. A tenant; `balance_micros` is the sum of its ledger, `held_micros` of its open holds.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq)]
#[sea_orm(table_name = "organizations")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub external_id: String,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub ledger_seq: i64,
    pub stripe_customer_id: Option<String>,
    pub creem_customer_id: Option<String>,
    pub last_purchase_attempt_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
