//! The whole data model: organizations, catalog (plans, packs, rates),
//! subscriptions, the credit ledger (lots, transactions, per-lot allocations,
//! reservations, idempotency records), orders, coupons, check-ins, processed
//! webhook events and the admin audit log.
//!
//! The database enforces what it can, so that a bug in the service cannot
//! silently corrupt money: unique idempotency keys, webhook event ids and
//! daily check-ins; `remaining >= 0` on lots; non-negative balances and holds;
//! foreign keys; closed sets of kinds and statuses.

use sea_orm_migration::{prelude::*, schema::*};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261121_000001_initial_schema"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in tables() {
            m.create_table(table).await?;
        }
        for index in indexes() {
            m.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Children before parents, so foreign keys never block a drop.
        let names: [DynIden; 18] = [
            AdminAudit::Table.into_iden(),
            WebhookEvents::Table.into_iden(),
            CheckinConfig::Table.into_iden(),
            Checkins::Table.into_iden(),
            CouponRedemptions::Table.into_iden(),
            IdempotencyRecords::Table.into_iden(),
            Reservations::Table.into_iden(),
            LotAllocations::Table.into_iden(),
            LedgerMonthly::Table.into_iden(),
            LedgerTransactions::Table.into_iden(),
            CreditLots::Table.into_iden(),
            Orders::Table.into_iden(),
            Coupons::Table.into_iden(),
            Subscriptions::Table.into_iden(),
            Rates::Table.into_iden(),
            Packs::Table.into_iden(),
            Plans::Table.into_iden(),
            Organizations::Table.into_iden(),
        ];
        for name in names {
            m.drop_table(Table::drop().table(name).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

/// `col IN (values…)`, for the closed sets of kinds and statuses.
fn one_of<C: IntoIden + Copy + 'static>(col: C, values: &[&str]) -> Expr {
    Expr::col(col).is_in(values.iter().map(|v| String::from(*v)))
}

fn fk(
    from_table: impl IntoIden,
    from_col: impl IntoIden,
    to_table: impl IntoIden,
    to_col: impl IntoIden,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .from(from_table, from_col)
        .to(to_table, to_col)
        .on_delete(ForeignKeyAction::Restrict)
        .on_update(ForeignKeyAction::Restrict)
        .to_owned()
}

pub const LOT_KINDS: &[&str] = &[
    "subscription",
    "top_up",
    "manual",
    "setup",
    "checkin",
    "coupon",
    "pending",
];

pub const TRANSACTION_TYPES: &[&str] = &[
    "purchase",
    "grant",
    "ai_usage",
    "storage_egress",
    "checkin",
    "coupon",
    "manual",
    "refund",
    "expiry",
    "reservation",
];

fn tables() -> Vec<TableCreateStatement> {
    vec![
        Table::create()
            .table(Organizations::Table)
            .if_not_exists()
            .col(big_pk_auto(Organizations::Id))
            .col(string_len_uniq(Organizations::ExternalId, 255))
            // Σ of the organization's ledger amounts (= Σ remaining of its lots).
            .col(
                big_integer(Organizations::BalanceMicros)
                    .default(0)
                    .check(Expr::col(Organizations::BalanceMicros).gte(0)),
            )
            // Σ of open reservation holds.
            .col(
                big_integer(Organizations::HeldMicros)
                    .default(0)
                    .check(Expr::col(Organizations::HeldMicros).gte(0)),
            )
            // Sequence number of the organization's latest ledger row.
            .col(big_integer(Organizations::LedgerSeq).default(0))
            .col(string_len_null(Organizations::StripeCustomerId, 255).unique_key())
            .col(string_len_null(Organizations::CreemCustomerId, 255).unique_key())
            .col(timestamp_with_time_zone_null(
                Organizations::LastPurchaseAttemptAt,
            ))
            .col(timestamp_with_time_zone(Organizations::CreatedAt))
            .col(timestamp_with_time_zone(Organizations::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(Plans::Table)
            .if_not_exists()
            .col(string_len(Plans::Id, 64).primary_key())
            .col(string_len_uniq(Plans::Code, 64))
            .col(string_len(Plans::Name, 255))
            .col(text(Plans::Description))
            .col(integer(Plans::Tier).check(Expr::col(Plans::Tier).gte(0)))
            .col(
                big_integer(Plans::PriceMonthlyCents)
                    .check(Expr::col(Plans::PriceMonthlyCents).gte(0)),
            )
            .col(
                big_integer(Plans::PriceYearlyCents)
                    .check(Expr::col(Plans::PriceYearlyCents).gte(0)),
            )
            .col(string_len(Plans::Currency, 3))
            .col(
                big_integer(Plans::CreditsIncluded).check(Expr::col(Plans::CreditsIncluded).gte(0)),
            )
            .col(json(Plans::Features))
            .col(boolean(Plans::Active))
            .col(string_len_null(Plans::StripePriceMonthly, 255))
            .col(string_len_null(Plans::StripePriceYearly, 255))
            .col(string_len_null(Plans::CreemProductId, 255))
            .col(integer(Plans::SortOrder).default(0))
            .col(timestamp_with_time_zone(Plans::CreatedAt))
            .col(timestamp_with_time_zone(Plans::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(Packs::Table)
            .if_not_exists()
            .col(string_len(Packs::Id, 64).primary_key())
            .col(string_len_uniq(Packs::Code, 64))
            .col(string_len(Packs::Name, 255))
            .col(big_integer(Packs::Credits).check(Expr::col(Packs::Credits).gt(0)))
            .col(big_integer(Packs::PriceCents).check(Expr::col(Packs::PriceCents).gte(0)))
            .col(string_len(Packs::Currency, 3))
            .col(boolean(Packs::Active))
            .col(integer(Packs::LimitPerCycle).check(Expr::col(Packs::LimitPerCycle).gte(0)))
            .col(integer_null(Packs::LotExpiryDays))
            .col(string_len_null(Packs::StripePriceId, 255))
            .col(string_len_null(Packs::CreemProductId, 255))
            .col(integer(Packs::SortOrder).default(0))
            .col(timestamp_with_time_zone(Packs::CreatedAt))
            .to_owned(),
        Table::create()
            .table(Rates::Table)
            .if_not_exists()
            .col(string_len(Rates::Id, 64).primary_key())
            .col(
                string_len(Rates::Meter, 32)
                    .check(one_of(Rates::Meter, &["storage_egress", "ai_tokens"])),
            )
            // '' is the meter's default rate, so (meter, model) can be unique.
            .col(string_len(Rates::Model, 128).default(""))
            .col(string_len(Rates::Unit, 32))
            .col(big_integer(Rates::UnitSize).check(Expr::col(Rates::UnitSize).gt(0)))
            .col(
                big_integer(Rates::CreditsPerUnitMicros)
                    .check(Expr::col(Rates::CreditsPerUnitMicros).gte(0)),
            )
            .col(text(Rates::Description))
            .col(boolean(Rates::Active))
            .col(timestamp_with_time_zone(Rates::CreatedAt))
            .to_owned(),
        Table::create()
            .table(Subscriptions::Table)
            .if_not_exists()
            .col(string_len(Subscriptions::Id, 64).primary_key())
            .col(big_integer(Subscriptions::OrgId))
            .col(string_len(Subscriptions::PlanId, 64))
            .col(string_len(Subscriptions::Status, 32).check(one_of(
                Subscriptions::Status,
                &[
                    "incomplete",
                    "trialing",
                    "active",
                    "past_due",
                    "canceled",
                    "unpaid",
                ],
            )))
            .col(
                string_len(Subscriptions::BillingPeriod, 16)
                    .check(one_of(Subscriptions::BillingPeriod, &["monthly", "yearly"])),
            )
            .col(string_len(Subscriptions::Channel, 16))
            .col(string_len_null(Subscriptions::ProviderSubscriptionId, 255))
            .col(timestamp_with_time_zone_null(
                Subscriptions::CurrentPeriodStart,
            ))
            .col(timestamp_with_time_zone_null(
                Subscriptions::CurrentPeriodEnd,
            ))
            .col(boolean(Subscriptions::CancelAtPeriodEnd).default(false))
            .col(timestamp_with_time_zone(Subscriptions::CreatedAt))
            .col(timestamp_with_time_zone(Subscriptions::UpdatedAt))
            .foreign_key(&mut fk(
                Subscriptions::Table,
                Subscriptions::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .foreign_key(&mut fk(
                Subscriptions::Table,
                Subscriptions::PlanId,
                Plans::Table,
                Plans::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Coupons::Table)
            .if_not_exists()
            .col(string_len(Coupons::Id, 64).primary_key())
            .col(string_len_uniq(Coupons::Code, 64))
            .col(string_len(Coupons::Kind, 16).check(one_of(
                Coupons::Kind,
                &["percent_off", "amount_off", "bonus_credits"],
            )))
            .col(big_integer(Coupons::Value).check(Expr::col(Coupons::Value).gt(0)))
            .col(integer_null(Coupons::MaxRedemptions))
            .col(integer(Coupons::RedeemedCount).default(0))
            .col(timestamp_with_time_zone_null(Coupons::ExpiresAt))
            .col(boolean(Coupons::Active))
            .col(timestamp_with_time_zone(Coupons::CreatedAt))
            .check(
                Expr::col(Coupons::MaxRedemptions)
                    .is_null()
                    .or(Expr::col(Coupons::RedeemedCount).lte(Expr::col(Coupons::MaxRedemptions))),
            )
            .check(Expr::col(Coupons::RedeemedCount).gte(0))
            .to_owned(),
        Table::create()
            .table(Orders::Table)
            .if_not_exists()
            .col(string_len(Orders::Id, 64).primary_key())
            .col(big_integer(Orders::OrgId))
            .col(
                string_len(Orders::Kind, 16).check(one_of(Orders::Kind, &["pack", "subscription"])),
            )
            .col(string_len(Orders::Status, 16).check(one_of(
                Orders::Status,
                &["pending", "paid", "failed", "expired", "refunded"],
            )))
            .col(string_len_null(Orders::PackId, 64))
            .col(string_len_null(Orders::PlanId, 64))
            .col(string_len_null(Orders::BillingPeriod, 16))
            .col(big_integer(Orders::AmountCents).check(Expr::col(Orders::AmountCents).gte(0)))
            .col(string_len(Orders::Currency, 3))
            .col(
                string_len(Orders::Channel, 16)
                    .check(one_of(Orders::Channel, &["stripe", "creem"])),
            )
            .col(string_len_null(Orders::CouponId, 64))
            .col(string_len_null(Orders::ProviderSessionId, 255))
            .col(string_len_null(Orders::ProviderPaymentId, 255))
            .col(string_len_null(Orders::ProviderSubscriptionId, 255))
            .col(big_integer(Orders::RefundedCents).default(0))
            .col(timestamp_with_time_zone(Orders::CreatedAt))
            .col(timestamp_with_time_zone_null(Orders::PaidAt))
            .col(timestamp_with_time_zone(Orders::UpdatedAt))
            .foreign_key(&mut fk(
                Orders::Table,
                Orders::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .foreign_key(&mut fk(
                Orders::Table,
                Orders::PackId,
                Packs::Table,
                Packs::Id,
            ))
            .foreign_key(&mut fk(
                Orders::Table,
                Orders::PlanId,
                Plans::Table,
                Plans::Id,
            ))
            .foreign_key(&mut fk(
                Orders::Table,
                Orders::CouponId,
                Coupons::Table,
                Coupons::Id,
            ))
            .to_owned(),
        Table::create()
            .table(CreditLots::Table)
            .if_not_exists()
            .col(big_pk_auto(CreditLots::Id))
            .col(big_integer(CreditLots::OrgId))
            .col(string_len(CreditLots::Kind, 16).check(one_of(CreditLots::Kind, LOT_KINDS)))
            .col(
                big_integer(CreditLots::AllocatedMicros)
                    .check(Expr::col(CreditLots::AllocatedMicros).gte(0)),
            )
            .col(big_integer(CreditLots::RemainingMicros))
            .col(timestamp_with_time_zone_null(CreditLots::ExpiresAt))
            // What granted the lot: (order|invoice|subscription_period|checkin|
            // coupon|manual, id). Unique, so a source grants at most once.
            .col(string_len(CreditLots::SourceType, 32))
            .col(string_len_null(CreditLots::SourceId, 255))
            .col(timestamp_with_time_zone(CreditLots::CreatedAt))
            .check(Expr::col(CreditLots::RemainingMicros).gte(0))
            .check(
                Expr::col(CreditLots::RemainingMicros).lte(Expr::col(CreditLots::AllocatedMicros)),
            )
            .foreign_key(&mut fk(
                CreditLots::Table,
                CreditLots::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .to_owned(),
        Table::create()
            .table(LedgerTransactions::Table)
            .if_not_exists()
            // UUIDv7, made by the service so batched inserts need no RETURNING.
            .col(string_len(LedgerTransactions::Id, 36).primary_key())
            .col(big_integer(LedgerTransactions::OrgId))
            // 1, 2, 3… per organization: exact order, and unique, so a lost
            // update cannot go unnoticed.
            .col(big_integer(LedgerTransactions::Seq))
            .col(
                string_len(LedgerTransactions::Type, 16)
                    .check(one_of(LedgerTransactions::Type, TRANSACTION_TYPES)),
            )
            .col(big_integer(LedgerTransactions::AmountMicros))
            .col(
                big_integer(LedgerTransactions::BalanceAfterMicros)
                    .check(Expr::col(LedgerTransactions::BalanceAfterMicros).gte(0)),
            )
            .col(text(LedgerTransactions::Description))
            .col(string_len_null(LedgerTransactions::ReferenceType, 32))
            .col(string_len_null(LedgerTransactions::ReferenceId, 255))
            .col(string_len_null(LedgerTransactions::Meter, 32))
            .col(big_integer_null(LedgerTransactions::Quantity))
            .col(string_len_null(LedgerTransactions::Model, 128))
            .col(timestamp_with_time_zone(LedgerTransactions::CreatedAt))
            .foreign_key(&mut fk(
                LedgerTransactions::Table,
                LedgerTransactions::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .to_owned(),
        // Per organization, month (`YYYY-MM`) and transaction type: the sums of
        // credits in and out, kept in the same transaction as the ledger rows
        // so balances and monthly statistics never scan the ledger.
        Table::create()
            .table(LedgerMonthly::Table)
            .if_not_exists()
            .col(big_integer(LedgerMonthly::OrgId))
            .col(string_len(LedgerMonthly::Month, 7))
            .col(string_len(LedgerMonthly::Type, 16))
            .col(
                big_integer(LedgerMonthly::CreditMicros)
                    .default(0)
                    .check(Expr::col(LedgerMonthly::CreditMicros).gte(0)),
            )
            .col(
                big_integer(LedgerMonthly::DebitMicros)
                    .default(0)
                    .check(Expr::col(LedgerMonthly::DebitMicros).gte(0)),
            )
            .primary_key(
                Index::create()
                    .col(LedgerMonthly::OrgId)
                    .col(LedgerMonthly::Month)
                    .col(LedgerMonthly::Type),
            )
            .foreign_key(&mut fk(
                LedgerMonthly::Table,
                LedgerMonthly::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .to_owned(),
        Table::create()
            .table(LotAllocations::Table)
            .if_not_exists()
            .col(big_pk_auto(LotAllocations::Id))
            .col(string_len(LotAllocations::TransactionId, 36))
            .col(big_integer(LotAllocations::LotId))
            // Signed: what the transaction moved into (+) or out of (-) the lot.
            .col(big_integer(LotAllocations::AmountMicros))
            .foreign_key(&mut fk(
                LotAllocations::Table,
                LotAllocations::TransactionId,
                LedgerTransactions::Table,
                LedgerTransactions::Id,
            ))
            .foreign_key(&mut fk(
                LotAllocations::Table,
                LotAllocations::LotId,
                CreditLots::Table,
                CreditLots::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Reservations::Table)
            .if_not_exists()
            .col(string_len(Reservations::Id, 64).primary_key())
            .col(big_integer(Reservations::OrgId))
            .col(
                big_integer(Reservations::HeldMicros)
                    .check(Expr::col(Reservations::HeldMicros).gte(0)),
            )
            .col(string_len(Reservations::Status, 16).check(one_of(
                Reservations::Status,
                &["open", "committed", "released", "expired"],
            )))
            .col(string_len_null(Reservations::Meter, 32))
            .col(big_integer_null(Reservations::Quantity))
            .col(string_len_null(Reservations::Model, 128))
            .col(string_len_null(Reservations::TransactionId, 36))
            .col(timestamp_with_time_zone(Reservations::ExpiresAt))
            .col(timestamp_with_time_zone(Reservations::CreatedAt))
            .col(timestamp_with_time_zone_null(Reservations::FinishedAt))
            .foreign_key(&mut fk(
                Reservations::Table,
                Reservations::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .foreign_key(&mut fk(
                Reservations::Table,
                Reservations::TransactionId,
                LedgerTransactions::Table,
                LedgerTransactions::Id,
            ))
            .to_owned(),
        Table::create()
            .table(IdempotencyRecords::Table)
            .if_not_exists()
            .col(big_pk_auto(IdempotencyRecords::Id))
            .col(big_integer(IdempotencyRecords::OrgId))
            .col(string_len(IdempotencyRecords::Method, 64))
            .col(string_len(IdempotencyRecords::Key, 255))
            // Digest of the request parameters: a replay must match it.
            .col(string_len(IdempotencyRecords::RequestHash, 64))
            // The first answer, replayed verbatim to duplicates.
            .col(text(IdempotencyRecords::Response))
            .col(timestamp_with_time_zone(IdempotencyRecords::CreatedAt))
            .foreign_key(&mut fk(
                IdempotencyRecords::Table,
                IdempotencyRecords::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .to_owned(),
        Table::create()
            .table(CouponRedemptions::Table)
            .if_not_exists()
            .col(big_pk_auto(CouponRedemptions::Id))
            .col(string_len(CouponRedemptions::CouponId, 64))
            .col(big_integer(CouponRedemptions::OrgId))
            .col(string_len_null(CouponRedemptions::OrderId, 64))
            .col(timestamp_with_time_zone(CouponRedemptions::CreatedAt))
            .foreign_key(&mut fk(
                CouponRedemptions::Table,
                CouponRedemptions::CouponId,
                Coupons::Table,
                Coupons::Id,
            ))
            .foreign_key(&mut fk(
                CouponRedemptions::Table,
                CouponRedemptions::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .foreign_key(&mut fk(
                CouponRedemptions::Table,
                CouponRedemptions::OrderId,
                Orders::Table,
                Orders::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Checkins::Table)
            .if_not_exists()
            .col(big_pk_auto(Checkins::Id))
            .col(big_integer(Checkins::OrgId))
            .col(string_len(Checkins::UserId, 255))
            // The UTC day, `YYYY-MM-DD`.
            .col(string_len(Checkins::Day, 10))
            .col(integer(Checkins::Streak).check(Expr::col(Checkins::Streak).gte(1)))
            .col(big_integer(Checkins::CreditsMicros))
            .col(string_len_null(Checkins::TransactionId, 36))
            .col(timestamp_with_time_zone(Checkins::CreatedAt))
            .foreign_key(&mut fk(
                Checkins::Table,
                Checkins::OrgId,
                Organizations::Table,
                Organizations::Id,
            ))
            .foreign_key(&mut fk(
                Checkins::Table,
                Checkins::TransactionId,
                LedgerTransactions::Table,
                LedgerTransactions::Id,
            ))
            .to_owned(),
        Table::create()
            .table(CheckinConfig::Table)
            .if_not_exists()
            .col(integer(CheckinConfig::Id).primary_key())
            .col(boolean(CheckinConfig::Enabled))
            .col(
                big_integer(CheckinConfig::CreditsPerDayMicros)
                    .check(Expr::col(CheckinConfig::CreditsPerDayMicros).gte(0)),
            )
            .col(
                integer(CheckinConfig::LotExpiryDays)
                    .check(Expr::col(CheckinConfig::LotExpiryDays).gte(1)),
            )
            .col(
                big_integer(CheckinConfig::StreakBonusMicros)
                    .check(Expr::col(CheckinConfig::StreakBonusMicros).gte(0)),
            )
            .col(timestamp_with_time_zone(CheckinConfig::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(WebhookEvents::Table)
            .if_not_exists()
            .col(big_pk_auto(WebhookEvents::Id))
            .col(string_len(WebhookEvents::Provider, 16))
            .col(string_len(WebhookEvents::EventId, 255))
            .col(string_len(WebhookEvents::EventType, 128))
            .col(timestamp_with_time_zone(WebhookEvents::ReceivedAt))
            .to_owned(),
        Table::create()
            .table(AdminAudit::Table)
            .if_not_exists()
            .col(big_pk_auto(AdminAudit::Id))
            .col(string_len(AdminAudit::ActorSub, 255))
            .col(string_len(AdminAudit::Action, 64))
            .col(string_len_null(AdminAudit::TargetOrg, 255))
            .col(text(AdminAudit::Reason))
            .col(text(AdminAudit::Details))
            .col(timestamp_with_time_zone(AdminAudit::CreatedAt))
            .to_owned(),
    ]
}

fn index(name: &str, table: impl IntoIden, cols: &[DynIden], unique: bool) -> IndexCreateStatement {
    let mut stmt = Index::create();
    stmt.name(name).table(table).if_not_exists();
    for col in cols {
        stmt.col(col.clone());
    }
    if unique {
        stmt.unique();
    }
    stmt.to_owned()
}

fn indexes() -> Vec<IndexCreateStatement> {
    vec![
        index(
            "uq_rates_meter_model",
            Rates::Table,
            &[Rates::Meter.into_iden(), Rates::Model.into_iden()],
            true,
        ),
        index(
            "uq_subscriptions_provider_id",
            Subscriptions::Table,
            &[
                Subscriptions::Channel.into_iden(),
                Subscriptions::ProviderSubscriptionId.into_iden(),
            ],
            true,
        ),
        index(
            "ix_subscriptions_org",
            Subscriptions::Table,
            &[Subscriptions::OrgId.into_iden()],
            false,
        ),
        index(
            "ix_orders_org_created",
            Orders::Table,
            &[Orders::OrgId.into_iden(), Orders::CreatedAt.into_iden()],
            false,
        ),
        index(
            "uq_orders_provider_session",
            Orders::Table,
            &[
                Orders::Channel.into_iden(),
                Orders::ProviderSessionId.into_iden(),
            ],
            true,
        ),
        index(
            "ix_orders_provider_payment",
            Orders::Table,
            &[Orders::ProviderPaymentId.into_iden()],
            false,
        ),
        index(
            "ix_credit_lots_org_expiry",
            CreditLots::Table,
            &[
                CreditLots::OrgId.into_iden(),
                CreditLots::ExpiresAt.into_iden(),
            ],
            false,
        ),
        index(
            "uq_credit_lots_source",
            CreditLots::Table,
            &[
                CreditLots::SourceType.into_iden(),
                CreditLots::SourceId.into_iden(),
            ],
            true,
        ),
        index(
            "uq_ledger_org_seq",
            LedgerTransactions::Table,
            &[
                LedgerTransactions::OrgId.into_iden(),
                LedgerTransactions::Seq.into_iden(),
            ],
            true,
        ),
        index(
            "ix_ledger_created",
            LedgerTransactions::Table,
            &[LedgerTransactions::CreatedAt.into_iden()],
            false,
        ),
        index(
            "ix_lot_allocations_transaction",
            LotAllocations::Table,
            &[LotAllocations::TransactionId.into_iden()],
            false,
        ),
        index(
            "ix_lot_allocations_lot",
            LotAllocations::Table,
            &[LotAllocations::LotId.into_iden()],
            false,
        ),
        index(
            "ix_reservations_status_expiry",
            Reservations::Table,
            &[
                Reservations::Status.into_iden(),
                Reservations::ExpiresAt.into_iden(),
            ],
            false,
        ),
        index(
            "ix_reservations_org_status",
            Reservations::Table,
            &[
                Reservations::OrgId.into_iden(),
                Reservations::Status.into_iden(),
            ],
            false,
        ),
        index(
            "uq_idempotency_org_method_key",
            IdempotencyRecords::Table,
            &[
                IdempotencyRecords::OrgId.into_iden(),
                IdempotencyRecords::Method.into_iden(),
                IdempotencyRecords::Key.into_iden(),
            ],
            true,
        ),
        index(
            "uq_coupon_redemptions_coupon_org",
            CouponRedemptions::Table,
            &[
                CouponRedemptions::CouponId.into_iden(),
                CouponRedemptions::OrgId.into_iden(),
            ],
            true,
        ),
        index(
            "uq_checkins_user_day",
            Checkins::Table,
            &[Checkins::UserId.into_iden(), Checkins::Day.into_iden()],
            true,
        ),
        index(
            "uq_webhook_events_provider_event",
            WebhookEvents::Table,
            &[
                WebhookEvents::Provider.into_iden(),
                WebhookEvents::EventId.into_iden(),
            ],
            true,
        ),
        index(
            "ix_admin_audit_created",
            AdminAudit::Table,
            &[AdminAudit::CreatedAt.into_iden()],
            false,
        ),
    ]
}

#[derive(DeriveIden, Clone, Copy)]
enum Organizations {
    Table,
    Id,
    ExternalId,
    BalanceMicros,
    HeldMicros,
    LedgerSeq,
    StripeCustomerId,
    CreemCustomerId,
    LastPurchaseAttemptAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Plans {
    Table,
    Id,
    Code,
    Name,
    Description,
    Tier,
    PriceMonthlyCents,
    PriceYearlyCents,
    Currency,
    CreditsIncluded,
    Features,
    Active,
    StripePriceMonthly,
    StripePriceYearly,
    CreemProductId,
    SortOrder,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Packs {
    Table,
    Id,
    Code,
    Name,
    Credits,
    PriceCents,
    Currency,
    Active,
    LimitPerCycle,
    LotExpiryDays,
    StripePriceId,
    CreemProductId,
    SortOrder,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Rates {
    Table,
    Id,
    Meter,
    Model,
    Unit,
    UnitSize,
    CreditsPerUnitMicros,
    Description,
    Active,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Subscriptions {
    Table,
    Id,
    OrgId,
    PlanId,
    Status,
    BillingPeriod,
    Channel,
    ProviderSubscriptionId,
    CurrentPeriodStart,
    CurrentPeriodEnd,
    CancelAtPeriodEnd,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Coupons {
    Table,
    Id,
    Code,
    Kind,
    Value,
    MaxRedemptions,
    RedeemedCount,
    ExpiresAt,
    Active,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Orders {
    Table,
    Id,
    OrgId,
    Kind,
    Status,
    PackId,
    PlanId,
    BillingPeriod,
    AmountCents,
    Currency,
    Channel,
    CouponId,
    ProviderSessionId,
    ProviderPaymentId,
    ProviderSubscriptionId,
    RefundedCents,
    CreatedAt,
    PaidAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum CreditLots {
    Table,
    Id,
    OrgId,
    Kind,
    AllocatedMicros,
    RemainingMicros,
    ExpiresAt,
    SourceType,
    SourceId,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum LedgerTransactions {
    Table,
    Id,
    OrgId,
    Seq,
    Type,
    AmountMicros,
    BalanceAfterMicros,
    Description,
    ReferenceType,
    ReferenceId,
    Meter,
    Quantity,
    Model,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum LedgerMonthly {
    Table,
    OrgId,
    Month,
    Type,
    CreditMicros,
    DebitMicros,
}

#[derive(DeriveIden, Clone, Copy)]
enum LotAllocations {
    Table,
    Id,
    TransactionId,
    LotId,
    AmountMicros,
}

#[derive(DeriveIden, Clone, Copy)]
enum Reservations {
    Table,
    Id,
    OrgId,
    HeldMicros,
    Status,
    Meter,
    Quantity,
    Model,
    TransactionId,
    ExpiresAt,
    CreatedAt,
    FinishedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum IdempotencyRecords {
    Table,
    Id,
    OrgId,
    Method,
    Key,
    RequestHash,
    Response,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum CouponRedemptions {
    Table,
    Id,
    CouponId,
    OrgId,
    OrderId,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Checkins {
    Table,
    Id,
    OrgId,
    UserId,
    Day,
    Streak,
    CreditsMicros,
    TransactionId,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum CheckinConfig {
    Table,
    Id,
    Enabled,
    CreditsPerDayMicros,
    LotExpiryDays,
    StreakBonusMicros,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum WebhookEvents {
    Table,
    Id,
    Provider,
    EventId,
    EventType,
    ReceivedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum AdminAudit {
    Table,
    Id,
    ActorSub,
    Action,
    TargetOrg,
    Reason,
    Details,
    CreatedAt,
}
