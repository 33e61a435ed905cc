//! Buying a pack: the rules, the order, the provider's checkout.
//!
//! The rules are checked in one transaction that first writes the
//! organization's row, so concurrent purchases of one organization (on
//! any replica) queue behind each other and each sees the orders and the
//! attempt time the previous one left:
//!
//! 1. the organization needs an active subscription to a plan of tier 1
//!    (Starter) or above (`SUBSCRIPTION_REQUIRED`);
//! 2. at most the pack's `limit_per_cycle` orders of that pack per billing
//!    cycle (the subscription's current period), counting paid and still
//!    open orders (`PACK_LIMIT_REACHED`);
//! 3. at most one purchase attempt per `PURCHASE_COOLDOWN_SECONDS`
//!    (`PURCHASE_COOLDOWN`, with `retry_after`). An attempt is a request
//!    that passed validation and the two rules above; a request refused
//!    earlier is not counted.
//!
//! Then the order is created `pending` and the provider asked for a
//! checkout. When the provider fails, the caller gets `UNAVAILABLE`, the
//! attempt is not counted, and the order is marked `failed` without a
//! session: the next purchase of the same pack reopens it, with the same
//! idempotency key at the provider, so a session the provider did open
//! (an answer lost to a timeout) is not opened twice, and a payment made
//! through it still fulfils the order.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter, TransactionTrait,
    sea_query::Expr,
};

use super::{orders::Status, stripe::client::PackCheckout, subscriptions::active_subscription};
use crate::{
    entities::{order, organization, pack},
    error::{Error, Result},
    state::AppState,
};

/// A payment provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stripe,
    Creem,
}

impl Channel {
    pub fn parse(field: &str, value: Option<&str>) -> Result<Self> {
        match value.map(str::trim).filter(|v| !v.is_empty()) {
            None | Some("stripe") => Ok(Self::Stripe),
            Some("creem") => Ok(Self::Creem),
            Some(other) => Err(Error::invalid(
                field,
                format!("unknown channel `{other}` (stripe, creem)"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stripe => "stripe",
            Self::Creem => "creem",
        }
    }
}

/// A checkout's `coupon_code`. No coupon exists until coupons are built,
/// so any code given is unknown (`INVALID_COUPON`).
pub fn check_coupon(code: Option<&str>) -> Result<()> {
    match code.map(str::trim).filter(|c| !c.is_empty()) {
        None => Ok(()),
        Some(c) if c.chars().count() > 64 => Err(Error::invalid(
            "coupon_code",
            "is longer than 64 characters",
        )),
        Some(c) => Err(Error::InvalidCoupon(format!("unknown coupon `{c}`"))),
    }
}

/// A validated pack purchase.
pub struct BuyPack {
    pub org: String,
    pub pack_id: String,
    pub channel: Channel,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

pub struct Checkout {
    pub order_id: String,
    pub session_id: String,
    pub url: String,
}

/// Checks the rules and records the attempt and the order (or reopens
/// the order a failed provider call left). Returns the order and the
/// organization's row as it was.
async fn open_order(
    state: &AppState,
    org_id: i64,
    pack: &pack::Model,
    channel: Channel,
    now: DateTime<Utc>,
) -> Result<(order::Model, organization::Model)> {
    let txn = state.db.begin().await?;
    // Writing the row first takes its lock (PostgreSQL) or the database's
    // write lock (SQLite) before anything is read.
    organization::Entity::update_many()
        .col_expr(
            organization::Column::UpdatedAt,
            Expr::col(organization::Column::UpdatedAt),
        )
        .filter(organization::Column::Id.eq(org_id))
        .exec(&txn)
        .await?;
    let org = organization::Entity::find_by_id(org_id)
        .one(&txn)
        .await?
        .ok_or_else(|| Error::internal(format!("organization {org_id} vanished")))?;

    let Some((sub, plan)) = active_subscription(&txn, org_id, now).await? else {
        return Err(Error::SubscriptionRequired);
    };
    if plan.tier < 1 {
        return Err(Error::SubscriptionRequired);
    }
    let cycle_start = sub.current_period_start.unwrap_or(sub.created_at);
    let open = || {
        order::Entity::find()
            .filter(order::Column::OrgId.eq(org_id))
            .filter(order::Column::PackId.eq(pack.id.clone()))
    };
    let reusable = open()
        .filter(order::Column::Status.eq(Status::Failed.as_str()))
        .filter(order::Column::Channel.eq(channel.as_str()))
        .filter(order::Column::ProviderSessionId.is_null())
        // Only this cycle's, so that a reopened order counts in it.
        .filter(order::Column::CreatedAt.gte(cycle_start))
        .one(&txn)
        .await?;
    let counted = open()
        .filter(order::Column::Status.is_in([Status::Pending.as_str(), Status::Paid.as_str()]))
        .filter(order::Column::CreatedAt.gte(cycle_start))
        .count(&txn)
        .await?;
    if counted >= u64::try_from(pack.limit_per_cycle.max(0)).unwrap_or(0) {
        return Err(Error::PackLimitReached {
            limit: pack.limit_per_cycle,
        });
    }
    let cooldown = state.config.purchase_cooldown;
    if let Some(last) = org.last_purchase_attempt_at {
        let next = last + cooldown;
        if next > now {
            let wait = (next - now).num_milliseconds().max(0) as u64;
            return Err(Error::PurchaseCooldown {
                retry_after: wait.div_ceil(1000).max(1),
                cooldown_seconds: cooldown.as_secs(),
            });
        }
    }
    organization::Entity::update_many()
        .col_expr(
            organization::Column::LastPurchaseAttemptAt,
            Expr::value(Some(now)),
        )
        .filter(organization::Column::Id.eq(org_id))
        .exec(&txn)
        .await?;
    let order = match reusable {
        Some(o) => {
            order::Entity::update_many()
                .col_expr(order::Column::Status, Expr::value(Status::Pending.as_str()))
                .col_expr(order::Column::UpdatedAt, Expr::value(now))
                .filter(order::Column::Id.eq(o.id.clone()))
                .exec(&txn)
                .await?;
            order::Model {
                status: Status::Pending.as_str().into(),
                updated_at: now,
                ..o
            }
        }
        None => {
            let o = order::Model {
                id: format!("ord_{}", uuid::Uuid::now_v7().simple()),
                org_id,
                kind: "pack".into(),
                status: Status::Pending.as_str().into(),
                pack_id: Some(pack.id.clone()),
                plan_id: None,
                billing_period: None,
                amount_cents: pack.price_cents,
                currency: pack.currency.clone(),
                channel: channel.as_str().into(),
                coupon_id: None,
                provider_session_id: None,
                provider_payment_id: None,
                provider_subscription_id: None,
                refunded_cents: 0,
                created_at: now,
                paid_at: None,
                updated_at: now,
            };
            order::Entity::insert(o.clone().into_active_model())
                .exec_without_returning(&txn)
                .await?;
            o
        }
    };
    txn.commit().await?;
    Ok((order, org))
}

/// Buys a pack: rules, order, checkout.
pub async fn buy_pack(state: &AppState, req: BuyPack) -> Result<Checkout> {
    let pack = pack::Entity::find_by_id(req.pack_id.clone())
        .filter(pack::Column::Active.eq(true))
        .one(&state.db)
        .await?
        .ok_or(Error::PackNotFound)?;
    let stripe = match req.channel {
        Channel::Stripe => state
            .stripe
            .clone()
            .ok_or(Error::PaymentProviderNotConfigured("stripe"))?,
        Channel::Creem => {
            if state.config.creem_api_key.is_none() {
                return Err(Error::PaymentProviderNotConfigured("creem"));
            }
            return Err(Error::NotImplemented("Creem checkout"));
        }
    };
    let now = state.clock.now();
    let org_id = state.ledger.ensure_org(&req.org).await?;
    let (order, org) = open_order(state, org_id, &pack, req.channel, now).await?;

    let result = async {
        let customer = match org.stripe_customer_id.clone() {
            Some(c) => c,
            None => {
                let c = stripe.create_customer(&req.org).await?;
                organization::Entity::update_many()
                    .col_expr(
                        organization::Column::StripeCustomerId,
                        Expr::value(Some(c.clone())),
                    )
                    .filter(organization::Column::Id.eq(org_id))
                    .filter(organization::Column::StripeCustomerId.is_null())
                    .exec(&state.db)
                    .await?;
                c
            }
        };
        stripe
            .pack_checkout(&PackCheckout {
                order_id: &order.id,
                org: &req.org,
                customer: &customer,
                name: &pack.name,
                currency: &pack.currency,
                amount_cents: pack.price_cents,
                price_id: pack.stripe_price_id.as_deref(),
                success_url: req.success_url.as_deref(),
                cancel_url: req.cancel_url.as_deref(),
            })
            .await
    }
    .await;
    let session = match result {
        Ok(s) => s,
        Err(e) => {
            // Not an attempt: the order waits to be reopened, and the
            // cooldown is given back (unless a later attempt took it).
            order::Entity::update_many()
                .col_expr(order::Column::Status, Expr::value(Status::Failed.as_str()))
                .col_expr(order::Column::UpdatedAt, Expr::value(now))
                .filter(order::Column::Id.eq(order.id.clone()))
                .filter(order::Column::Status.eq(Status::Pending.as_str()))
                .filter(order::Column::ProviderSessionId.is_null())
                .exec(&state.db)
                .await?;
            organization::Entity::update_many()
                .col_expr(
                    organization::Column::LastPurchaseAttemptAt,
                    Expr::value(org.last_purchase_attempt_at),
                )
                .filter(organization::Column::Id.eq(org_id))
                .filter(organization::Column::LastPurchaseAttemptAt.eq(now))
                .exec(&state.db)
                .await?;
            return Err(e);
        }
    };
    order::Entity::update_many()
        .col_expr(
            order::Column::ProviderSessionId,
            Expr::value(Some(session.id.clone())),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(now))
        .filter(order::Column::Id.eq(order.id.clone()))
        .exec(&state.db)
        .await?;
    Ok(Checkout {
        order_id: order.id,
        session_id: session.id,
        url: session.url,
    })
}
