//! `credit_lots` table. Credits granted together, spent earliest-expiry first.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq, serde::Deserialize)]
#[sea_orm(table_name = "credit_lots")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub org_id: i64,
    pub kind: String,
    pub allocated_micros: i64,
    pub remaining_micros: i64,
    pub expires_at: Option<DateTimeUtc>,
    pub source_type: String,
    pub source_id: Option<String>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
