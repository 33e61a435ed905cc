//! What subscription payments need: the provider payment an order paid for,
//! and the provider's time of the subscription state a row holds.
//!
//! * `orders.provider_invoice_id`: a subscription is paid period after
//!   period, each payment (a Stripe invoice, a Creem billing period) one
//!   order. Unique per channel, so two deliveries of one payment can never
//!   make two orders.
//! * `subscriptions.provider_updated_at`: when the provider produced the
//!   state the row holds. Events arrive in any order; an older state never
//!   overwrites a newer one.

use sea_orm_migration::{prelude::*, schema::*};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261203_000003_subscription_payments"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Orders::Table)
                .add_column(string_len_null(Orders::ProviderInvoiceId, 255))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("uq_orders_provider_invoice")
                .table(Orders::Table)
                .col(Orders::Channel)
                .col(Orders::ProviderInvoiceId)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_orders_provider_subscription")
                .table(Orders::Table)
                .col(Orders::ProviderSubscriptionId)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Subscriptions::Table)
                .add_column(timestamp_with_time_zone_null(
                    Subscriptions::ProviderUpdatedAt,
                ))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Subscriptions::Table)
                .drop_column(Subscriptions::ProviderUpdatedAt)
                .to_owned(),
        )
        .await?;
        for name in [
            "ix_orders_provider_subscription",
            "uq_orders_provider_invoice",
        ] {
            m.drop_index(Index::drop().name(name).table(Orders::Table).to_owned())
                .await?;
        }
        m.alter_table(
            Table::alter()
                .table(Orders::Table)
                .drop_column(Orders::ProviderInvoiceId)
                .to_owned(),
        )
        .await
    }
}

#[derive(DeriveIden)]
enum Orders {
    Table,
    Channel,
    ProviderInvoiceId,
    ProviderSubscriptionId,
}

#[derive(DeriveIden)]
enum Subscriptions {
    Table,
    ProviderUpdatedAt,
}
