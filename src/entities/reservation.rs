//! `reservations` table. Two-phase holds on credits.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq, serde::Deserialize)]
#[sea_orm(table_name = "reservations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: i64,
    pub held_micros: i64,
    pub status: String,
    pub meter: Option<String>,
    pub quantity: Option<i64>,
    pub model: Option<String>,
    pub transaction_id: Option<String>,
    pub expires_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
    /// What a committed hold charged.
    pub charged_micros: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
