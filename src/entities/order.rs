//! `orders` table. Payment orders for packs and plans.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: i64,
    pub kind: String,
    pub status: String,
    pub pack_id: Option<String>,
    pub plan_id: Option<String>,
    pub billing_period: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
    pub channel: String,
    pub coupon_id: Option<String>,
    pub provider_session_id: Option<String>,
    pub provider_payment_id: Option<String>,
    pub provider_subscription_id: Option<String>,
    /// The provider payment of a subscription period this order is.
    pub provider_invoice_id: Option<String>,
    pub refunded_cents: i64,
    pub created_at: DateTimeUtc,
    pub paid_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
