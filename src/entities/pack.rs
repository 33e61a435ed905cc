//! `packs` table. Credit packs (catalog).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq)]
#[sea_orm(table_name = "packs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(unique)]
    pub code: String,
    pub name: String,
    pub credits: i64,
    pub price_cents: i64,
    pub currency: String,
    pub active: bool,
    pub limit_per_cycle: i32,
    pub lot_expiry_days: Option<i32>,
    pub stripe_price_id: Option<String>,
    pub creem_product_id: Option<String>,
    pub sort_order: i32,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
