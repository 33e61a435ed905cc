//! `lot_allocations` table. Which lots each ledger row moved credits into (+) or out of (-),
//! keyed by (transaction, lot): a ledger row moves a lot at most once.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq)]
#[sea_orm(table_name = "lot_allocations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub transaction_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub lot_id: i64,
    pub amount_micros: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
