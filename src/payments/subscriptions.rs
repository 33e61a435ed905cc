//! Subscriptions as the providers report them, and the credits each paid
//! period brings.
//!
//! * [`record`] keeps one row per provider subscription (unique per
//!   channel and provider id) up to date from whatever the provider says
//!   about it: an event or a retrieved object. Events arrive in any
//!   order, so a state is written only if the provider produced it no
//!   earlier than the state the row holds, and a `canceled` subscription
//!   never comes back to life (providers never reactivate one).
//! * [`period_paid`] grants a paid period's credits: a `subscription` lot
//!   of the plan's credits expiring at the period's end, sourced by the
//!   provider's payment (`invoice`/`<Stripe invoice id>`, or
//!   `creem_period`/`<subscription>:<period start>`), so that each payment
//!   grants once whichever events carry it. In the same transaction the
//!   payment becomes an order (the checkout's order for the first one,
//!   a new order per renewal; unique per channel and payment, so never
//!   two) and the subscription's period moves forward.
//!
//! The plan in force is read by [`crate::catalog::active_subscription`]:
//! a canceled subscription leaves the organization on the free plan; a
//! plan change (the subscription's price or product changes) takes effect
//! from the next paid period, whose grant is the new plan's.

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter,
    sea_query::{Expr, ExprTrait, OnConflict, Query},
};

use super::{
    orders::Status,
    purchase::{Channel, Period},
};
use crate::{
    domain::MICROS_PER_CREDIT,
    entities::{order, organization, plan, subscription},
    error::{Error, Result},
    ledger::{GrantInput, LotKind, SideWrite},
    state::AppState,
};

/// A subscription's state as a provider reported it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub channel: Channel,
    pub id: String,
    /// The provider's status word (mapped by [`status`]).
    pub status: String,
    /// The organization's external id, from the metadata the service wrote.
    pub org: Option<String>,
    pub customer: Option<String>,
    /// The plan id (or code) from the metadata the service wrote.
    pub plan: Option<String>,
    /// The provider's price (Stripe) or product (Creem) id.
    pub price: Option<String>,
    pub period_kind: Option<Period>,
    pub period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub cancel_at_period_end: bool,
    /// When the provider produced this state.
    pub as_of: DateTime<Utc>,
}

/// The stored status for a provider's status word: the statuses in which
/// a plan is in force keep their name; anything that means "not paid
/// for" is `unpaid` or `canceled`.
pub fn status(provider_status: &str) -> &'static str {
    match provider_status {
        "active" | "scheduled_cancel" => "active",
        "trialing" => "trialing",
        "past_due" => "past_due",
        "canceled" | "cancelled" | "incomplete_expired" | "expired" => "canceled",
        "unpaid" | "paused" => "unpaid",
        _ => "incomplete",
    }
}

/// The plan a provider price or product id is, with the billing period
/// it is priced for when that is known; else the plan the metadata names.
pub async fn resolve_plan(
    db: &impl ConnectionTrait,
    channel: Channel,
    price: Option<&str>,
    named: Option<&str>,
) -> Result<Option<(plan::Model, Option<Period>)>> {
    if let Some(price) = price {
        let found = match channel {
            Channel::Stripe => plan::Entity::find()
                .filter(
                    plan::Column::StripePriceMonthly
                        .eq(price)
                        .or(plan::Column::StripePriceYearly.eq(price)),
                )
                .one(db)
                .await?
                .map(|p| {
                    let period = if p.stripe_price_yearly.as_deref() == Some(price) {
                        Period::Yearly
                    } else {
                        Period::Monthly
                    };
                    (p, Some(period))
                }),
            Channel::Creem => plan::Entity::find()
                .filter(plan::Column::CreemProductId.eq(price))
                .one(db)
                .await?
                .map(|p| (p, None)),
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    let Some(named) = named else {
        return Ok(None);
    };
    Ok(plan::Entity::find()
        .filter(plan::Column::Id.eq(named).or(plan::Column::Code.eq(named)))
        .one(db)
        .await?
        .map(|p| (p, None)))
}

/// The stored subscription `id` of `channel`.
pub async fn find(
    db: &impl ConnectionTrait,
    channel: Channel,
    id: &str,
) -> Result<Option<subscription::Model>> {
    Ok(subscription::Entity::find()
        .filter(subscription::Column::Channel.eq(channel.as_str()))
        .filter(subscription::Column::ProviderSubscriptionId.eq(id))
        .one(db)
        .await?)
}

async fn org_of(state: &AppState, s: &Observed) -> Result<Option<i64>> {
    if let Some(org) = &s.org {
        return state.ledger.ensure_org(org).await.map(Some);
    }
    let Some(customer) = &s.customer else {
        return Ok(None);
    };
    let column = match s.channel {
        Channel::Stripe => organization::Column::StripeCustomerId,
        Channel::Creem => organization::Column::CreemCustomerId,
    };
    Ok(organization::Entity::find()
        .filter(column.eq(customer.as_str()))
        .one(&state.db)
        .await?
        .map(|o| o.id))
}

/// Remembers the provider customer of an organization that has none yet
/// (the portal needs it), unless another organization has it.
async fn remember_customer(state: &AppState, org_id: i64, s: &Observed) -> Result<()> {
    let Some(customer) = &s.customer else {
        return Ok(());
    };
    let column = match s.channel {
        Channel::Stripe => organization::Column::StripeCustomerId,
        Channel::Creem => organization::Column::CreemCustomerId,
    };
    let taken = organization::Entity::find()
        .filter(column.eq(customer.as_str()))
        .one(&state.db)
        .await?
        .is_some();
    if !taken {
        organization::Entity::update_many()
            .col_expr(column, Expr::value(Some(customer.clone())))
            .filter(organization::Column::Id.eq(org_id))
            .filter(column.is_null())
            .exec(&state.db)
            .await?;
    }
    Ok(())
}

/// Records what the provider says about a subscription; the row as it
/// stands afterwards, or `None` when the subscription is not one of this
/// service's (no organization or plan can be told).
pub async fn record(state: &AppState, s: &Observed) -> Result<Option<subscription::Model>> {
    let db = &state.db;
    let existing = find(db, s.channel, &s.id).await?;
    let org_id = match &existing {
        Some(row) => Some(row.org_id),
        None => org_of(state, s).await?,
    };
    let Some(org_id) = org_id else {
        return Ok(None);
    };
    let resolved = resolve_plan(db, s.channel, s.price.as_deref(), s.plan.as_deref()).await?;
    let (plan_id, priced_for) = match (resolved, &existing) {
        (Some((p, period)), _) => (p.id, period),
        (None, Some(row)) => (row.plan_id.clone(), None),
        (None, None) => return Ok(None),
    };
    let billing_period = priced_for
        .or(s.period_kind)
        .map(Period::as_str)
        .or(existing.as_ref().map(|r| r.billing_period.as_str()))
        .unwrap_or(Period::Monthly.as_str())
        .to_owned();
    let now = state.clock.now();
    let new_status = status(&s.status);
    if existing.is_none() {
        let row = subscription::Model {
            id: format!("sub_{}", uuid::Uuid::now_v7().simple()),
            org_id,
            plan_id: plan_id.clone(),
            status: new_status.into(),
            billing_period: billing_period.clone(),
            channel: s.channel.as_str().into(),
            provider_subscription_id: Some(s.id.clone()),
            current_period_start: s.period.map(|p| p.0),
            current_period_end: s.period.map(|p| p.1),
            cancel_at_period_end: s.cancel_at_period_end,
            provider_updated_at: Some(s.as_of),
            created_at: now,
            updated_at: now,
        };
        subscription::Entity::insert(row.into_active_model())
            .on_conflict(
                OnConflict::columns([
                    subscription::Column::Channel,
                    subscription::Column::ProviderSubscriptionId,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    // Applies to the row whoever inserted it, unless it holds a newer state.
    let mut update = subscription::Entity::update_many()
        .col_expr(subscription::Column::PlanId, Expr::value(plan_id))
        .col_expr(subscription::Column::Status, Expr::value(new_status))
        .col_expr(
            subscription::Column::BillingPeriod,
            Expr::value(billing_period),
        )
        .col_expr(
            subscription::Column::CancelAtPeriodEnd,
            Expr::value(s.cancel_at_period_end),
        )
        .col_expr(
            subscription::Column::ProviderUpdatedAt,
            Expr::value(Some(s.as_of)),
        )
        .col_expr(subscription::Column::UpdatedAt, Expr::value(now));
    if let Some((start, end)) = s.period {
        update = update
            .col_expr(
                subscription::Column::CurrentPeriodStart,
                Expr::value(Some(start)),
            )
            .col_expr(
                subscription::Column::CurrentPeriodEnd,
                Expr::value(Some(end)),
            );
    }
    let mut update = update
        .filter(subscription::Column::Channel.eq(s.channel.as_str()))
        .filter(subscription::Column::ProviderSubscriptionId.eq(s.id.as_str()))
        .filter(
            subscription::Column::ProviderUpdatedAt
                .is_null()
                .or(subscription::Column::ProviderUpdatedAt.lte(s.as_of)),
        );
    if new_status != "canceled" {
        update = update.filter(subscription::Column::Status.ne("canceled"));
    }
    update.exec(db).await?;
    remember_customer(state, org_id, s).await?;
    find(db, s.channel, &s.id).await
}

/// One paid period of a subscription.
#[derive(Debug, Clone)]
pub struct PeriodPayment {
    pub channel: Channel,
    /// The provider's payment: a Stripe invoice id, or a Creem
    /// `<subscription>:<period start>`. Grants once per key.
    pub key: String,
    /// The checkout order this subscription was bought with, when known.
    pub order: Option<String>,
    /// The subscription's first payment (`None`: not said).
    pub first: Option<bool>,
    pub payment: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
    pub price: Option<String>,
    pub period: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Channel {
    /// The ledger source type of a paid subscription period.
    pub fn period_source(self) -> &'static str {
        match self {
            Self::Stripe => "invoice",
            Self::Creem => "creem_period",
        }
    }
}

fn guessed_end(start: DateTime<Utc>, period: &str) -> DateTime<Utc> {
    match period {
        "yearly" => start + TimeDelta::days(366),
        _ => start + TimeDelta::days(31),
    }
}

/// The payment's order: the checkout order of the subscription when this
/// is its first payment and the checkout order has none yet (guarded, so
/// two payments can never both take it), else a new order unique on the
/// payment.
async fn order_write(
    state: &AppState,
    sub: &subscription::Model,
    p: &PeriodPayment,
    plan: &plan::Model,
    now: DateTime<Utc>,
) -> Result<SideWrite> {
    let backend = state.db.get_database_backend();
    let checkout = match &p.order {
        Some(id) if p.first != Some(false) => {
            order::Entity::find_by_id(id.as_str())
                .filter(order::Column::OrgId.eq(sub.org_id))
                .filter(order::Column::Kind.eq("subscription"))
                .filter(order::Column::ProviderInvoiceId.is_null())
                .one(&state.db)
                .await?
        }
        _ => None,
    };
    if let Some(o) = checkout {
        let mut stmt = Query::update();
        stmt.table(order::Entity)
            .value(order::Column::Status, Status::Paid.as_str())
            .value(order::Column::PaidAt, Some(now))
            .value(order::Column::ProviderInvoiceId, Some(p.key.clone()))
            .value(
                order::Column::ProviderSubscriptionId,
                sub.provider_subscription_id.clone(),
            )
            .value(order::Column::UpdatedAt, now)
            .and_where(Expr::col(order::Column::Id).eq(o.id))
            .and_where(Expr::col(order::Column::ProviderInvoiceId).is_null());
        if let Some(pay) = &p.payment {
            stmt.value(order::Column::ProviderPaymentId, Some(pay.clone()));
        }
        if p.amount_cents > 0 {
            stmt.value(order::Column::AmountCents, p.amount_cents);
        }
        return Ok(SideWrite {
            statement: backend.build(&stmt),
            expect_rows: Some(1),
        });
    }
    let row = order::Model {
        id: format!("ord_{}", uuid::Uuid::now_v7().simple()),
        org_id: sub.org_id,
        kind: "subscription".into(),
        status: Status::Paid.as_str().into(),
        pack_id: None,
        plan_id: Some(plan.id.clone()),
        billing_period: Some(sub.billing_period.clone()),
        amount_cents: Ord::max(p.amount_cents, 0),
        currency: if p.currency.is_empty() {
            plan.currency.clone()
        } else {
            p.currency.to_ascii_uppercase()
        },
        channel: p.channel.as_str().into(),
        coupon_id: None,
        provider_session_id: None,
        provider_payment_id: p.payment.clone(),
        provider_subscription_id: sub.provider_subscription_id.clone(),
        provider_invoice_id: Some(p.key.clone()),
        refunded_cents: 0,
        created_at: now,
        paid_at: Some(now),
        updated_at: now,
    };
    let stmt = Query::insert()
        .into_table(order::Entity)
        .columns([
            order::Column::Id,
            order::Column::OrgId,
            order::Column::Kind,
            order::Column::Status,
            order::Column::PlanId,
            order::Column::BillingPeriod,
            order::Column::AmountCents,
            order::Column::Currency,
            order::Column::Channel,
            order::Column::ProviderPaymentId,
            order::Column::ProviderSubscriptionId,
            order::Column::ProviderInvoiceId,
            order::Column::RefundedCents,
            order::Column::CreatedAt,
            order::Column::PaidAt,
            order::Column::UpdatedAt,
        ])
        .values_panic([
            row.id.into(),
            row.org_id.into(),
            row.kind.into(),
            row.status.into(),
            row.plan_id.into(),
            row.billing_period.into(),
            row.amount_cents.into(),
            row.currency.into(),
            row.channel.into(),
            row.provider_payment_id.into(),
            row.provider_subscription_id.into(),
            row.provider_invoice_id.into(),
            row.refunded_cents.into(),
            row.created_at.into(),
            row.paid_at.into(),
            row.updated_at.into(),
        ])
        .on_conflict(
            OnConflict::columns([order::Column::Channel, order::Column::ProviderInvoiceId])
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    Ok(SideWrite {
        statement: backend.build(&stmt),
        expect_rows: None,
    })
}

/// Grants a paid period of `sub` (see the module documentation).
pub async fn period_paid(
    state: &AppState,
    sub: &subscription::Model,
    p: &PeriodPayment,
) -> Result<()> {
    let now = state.clock.now();
    let plan = match resolve_plan(&state.db, p.channel, p.price.as_deref(), None).await? {
        Some((plan, _)) => plan,
        None => plan::Entity::find_by_id(sub.plan_id.as_str())
            .one(&state.db)
            .await?
            .ok_or_else(|| Error::internal(format!("subscription {} has no plan", sub.id)))?,
    };
    let (start, end) = p
        .period
        .or(sub.current_period_start.zip(sub.current_period_end))
        .unwrap_or_else(|| (now, guessed_end(now, &sub.billing_period)));
    let org = organization::Entity::find_by_id(sub.org_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal(format!("subscription {} has no organization", sub.id)))?;

    let mut writes = vec![order_write(state, sub, p, &plan, now).await?];
    let mut advance = Query::update();
    advance
        .table(subscription::Entity)
        .value(subscription::Column::CurrentPeriodStart, Some(start))
        .value(subscription::Column::CurrentPeriodEnd, Some(end))
        .value(subscription::Column::UpdatedAt, now)
        .and_where(Expr::col(subscription::Column::Id).eq(sub.id.as_str()))
        .and_where(
            Expr::col(subscription::Column::CurrentPeriodEnd)
                .is_null()
                .or(Expr::col(subscription::Column::CurrentPeriodEnd).lt(end)),
        );
    writes.push(SideWrite {
        statement: state.db.get_database_backend().build(&advance),
        expect_rows: None,
    });

    let credits = plan.credits_included.saturating_mul(MICROS_PER_CREDIT);
    if credits <= 0 {
        // A plan without credits: the payment is still an order.
        for w in writes {
            state.db.execute_raw(w.statement).await?;
        }
        return Ok(());
    }
    state
        .ledger
        .grant(GrantInput {
            org: org.external_id,
            entry_kind: "grant",
            lot_kind: LotKind::Subscription,
            amount: credits,
            expires_at: Some(end),
            source_type: p.channel.period_source().into(),
            source_id: Some(p.key.clone()),
            description: format!("{} plan credits until {}", plan.name, end.date_naive()),
            then: writes,
        })
        .await?;
    Ok(())
}
