//! A coupon is redeemed once per paid order, not once per organization:
//! the unique index on (coupon, organization) becomes one on the order, so
//! that a replayed payment event cannot redeem twice while one
//! organization may use a coupon on several orders (within the coupon's
//! `max_redemptions`).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000001_redemption_per_order"
    }
}

#[derive(DeriveIden)]
enum CouponRedemptions {
    Table,
    CouponId,
    OrgId,
    OrderId,
}

const OLD: &str = "uq_coupon_redemptions_coupon_org";
const NEW: &str = "uq_coupon_redemptions_order";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name(OLD)
                .table(CouponRedemptions::Table)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name(NEW)
                .table(CouponRedemptions::Table)
                .col(CouponRedemptions::OrderId)
                .unique()
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name(NEW)
                .table(CouponRedemptions::Table)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name(OLD)
                .table(CouponRedemptions::Table)
                .col(CouponRedemptions::CouponId)
                .col(CouponRedemptions::OrgId)
                .unique()
                .to_owned(),
        )
        .await
    }
}
