//! Buying: a pack (its rules, the order, the provider's checkout), or a
//! subscription to a plan (the order and the provider's checkout).
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
    ColumnTrait, Condition, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter,
    sea_query::Expr,
};

use super::{
    creem::{Creem, wire},
    orders::Status,
    stripe::{
        Stripe,
        client::{CheckoutRequest, Interval, Sale, Session},
    },
};
use crate::catalog::active_subscription;
use crate::coupons::redeem::{self, Applied};
use crate::{
    entities::{order, organization, pack, plan},
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
    pub const ALL: [Self; 2] = [Self::Stripe, Self::Creem];

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

/// How often a plan is paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Monthly,
    Yearly,
}

impl Period {
    pub const ALL: [Self; 2] = [Self::Monthly, Self::Yearly];

    /// `monthly` (the default) or `yearly`.
    pub fn parse(field: &str, value: Option<&str>) -> Result<Self> {
        match value.map(str::trim).filter(|v| !v.is_empty()) {
            None | Some("monthly") => Ok(Self::Monthly),
            Some("yearly") => Ok(Self::Yearly),
            Some(other) => Err(Error::invalid(
                field,
                format!("unknown billing period `{other}` (monthly, yearly)"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Monthly => "monthly",
            Self::Yearly => "yearly",
        }
    }
}

/// A validated pack purchase.
pub struct BuyPack {
    pub org: String,
    pub pack_id: String,
    pub channel: Channel,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    /// A coupon code, as [`redeem::code`] gives it.
    pub coupon: Option<String>,
}

pub struct Checkout {
    pub order_id: String,
    pub session_id: String,
    pub url: String,
}

/// Checks the rules, claims the coupon, and records the attempt and the
/// order (or reopens the order a failed provider call left with the same
/// coupon). Returns the order, the organization's row as it was, and the
/// coupon applied.
async fn open_order(
    state: &AppState,
    org_id: i64,
    pack: &pack::Model,
    channel: Channel,
    coupon: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(order::Model, organization::Model, Option<Applied>)> {
    let txn = crate::db::begin_write(&state.db).await?;
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
    let applied = match coupon {
        Some(code) => Some(redeem::claim(&txn, code, pack.price_cents, now).await?),
        None => None,
    };
    let coupon_id = applied.as_ref().map(|a| a.coupon_id.clone());
    let reusable = open()
        .filter(order::Column::Status.eq(Status::Failed.as_str()))
        .filter(order::Column::Channel.eq(channel.as_str()))
        .filter(order::Column::ProviderSessionId.is_null())
        .filter(same_coupon(coupon_id.as_deref()))
        // Only this cycle's, so that a reopened order counts in it.
        .filter(order::Column::CreatedAt.gte(cycle_start))
        .one(&txn)
        .await?;
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
                amount_cents: applied
                    .as_ref()
                    .map_or(pack.price_cents, |a| a.amount_cents),
                currency: pack.currency.clone(),
                channel: channel.as_str().into(),
                coupon_id,
                provider_session_id: None,
                provider_payment_id: None,
                provider_subscription_id: None,
                provider_invoice_id: None,
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
    Ok((order, org, applied))
}

/// Orders with coupon `id` (or with none).
fn same_coupon(id: Option<&str>) -> Condition {
    match id {
        Some(id) => Condition::all().add(order::Column::CouponId.eq(id)),
        None => Condition::all().add(order::Column::CouponId.is_null()),
    }
}

/// A configured provider.
enum Provider<'a> {
    Stripe(&'a Stripe),
    Creem(&'a Creem),
}

/// Who is buying: the organization's external id and its row.
struct Buyer<'a> {
    org: &'a str,
    row: &'a organization::Model,
}

/// The channel's client: `503 PAYMENT_PROVIDER_NOT_CONFIGURED` without
/// its key.
fn provider(state: &AppState, channel: Channel) -> Result<Provider<'_>> {
    match channel {
        Channel::Stripe => state
            .stripe
            .as_ref()
            .map(Provider::Stripe)
            .ok_or(Error::PaymentProviderNotConfigured("stripe")),
        Channel::Creem => state
            .creem
            .as_ref()
            .map(Provider::Creem)
            .ok_or(Error::PaymentProviderNotConfigured("creem")),
    }
}

/// What a checkout sells, as the providers need it.
struct Item<'a> {
    name: &'a str,
    currency: &'a str,
    amount_cents: i64,
    stripe_price: Option<&'a str>,
    creem_product: Option<&'a str>,
    /// A plan, with its id and billing period; `None` for a pack.
    plan: Option<(&'a str, Period)>,
    /// A discount coupon's code, for Creem to apply as its discount code.
    discount_code: Option<String>,
}

impl Item<'_> {
    /// The item as sold with `applied`: a discount changes what Stripe
    /// charges (an inline price of the discounted amount replaces the
    /// configured price id) and goes to Creem as its discount code.
    fn with_coupon(mut self, applied: Option<&Applied>, amount_cents: i64) -> Self {
        if let Some(a) = applied.filter(|a| a.is_discount()) {
            self.amount_cents = amount_cents;
            self.stripe_price = None;
            self.discount_code = Some(a.code.clone());
        }
        self
    }

    /// Creem sells only its own products.
    fn check(&self, channel: Channel) -> Result<()> {
        match channel {
            Channel::Stripe => Ok(()),
            Channel::Creem if self.creem_product.is_some() => Ok(()),
            Channel::Creem => Err(Error::CreemProductNotConfigured),
        }
    }
}

/// The organization's Stripe customer, created once (keyed on the
/// organization at Stripe, and stored only where none is yet).
async fn stripe_customer(
    state: &AppState,
    stripe: &Stripe,
    org: &str,
    row: &organization::Model,
) -> Result<String> {
    if let Some(c) = &row.stripe_customer_id {
        return Ok(c.clone());
    }
    let c = stripe.create_customer(org).await?;
    organization::Entity::update_many()
        .col_expr(
            organization::Column::StripeCustomerId,
            Expr::value(Some(c.clone())),
        )
        .filter(organization::Column::Id.eq(row.id))
        .filter(organization::Column::StripeCustomerId.is_null())
        .exec(&state.db)
        .await?;
    Ok(c)
}

/// Asks the provider for the order's checkout.
async fn provider_checkout(
    state: &AppState,
    provider: &Provider<'_>,
    Buyer { org, row }: &Buyer<'_>,
    order: &order::Model,
    item: &Item<'_>,
    urls: (Option<&str>, Option<&str>),
) -> Result<Session> {
    match provider {
        Provider::Stripe(stripe) => {
            let customer = stripe_customer(state, stripe, org, row).await?;
            let sale = match item.plan {
                None => Sale::Pack,
                Some((plan_id, period)) => Sale::Plan {
                    plan_id,
                    interval: match period {
                        Period::Monthly => Interval::Month,
                        Period::Yearly => Interval::Year,
                    },
                },
            };
            stripe
                .checkout(&CheckoutRequest {
                    sale,
                    order_id: &order.id,
                    org,
                    customer: &customer,
                    name: item.name,
                    currency: item.currency,
                    amount_cents: item.amount_cents,
                    price_id: item.stripe_price,
                    success_url: urls.0,
                    cancel_url: urls.1,
                })
                .await
        }
        Provider::Creem(creem) => {
            let product = item.creem_product.ok_or(Error::CreemProductNotConfigured)?;
            let answer = creem
                .checkout(&wire::CheckoutRequest {
                    product_id: product.to_owned(),
                    request_id: order.id.clone(),
                    success_url: urls.0.map(str::to_owned),
                    metadata: wire::CheckoutMetadata {
                        order_id: order.id.clone(),
                        org_id: (*org).to_owned(),
                        plan_id: item.plan.map(|(id, _)| id.to_owned()),
                    },
                    customer: row
                        .creem_customer_id
                        .clone()
                        .map(|id| wire::CustomerRef { id }),
                    discount_code: item.discount_code.clone(),
                })
                .await?;
            Ok(Session {
                id: answer.id,
                url: answer.checkout_url,
            })
        }
    }
}

/// Opens the provider's checkout for an open order and records its
/// session. When the provider fails, the order is marked `failed`
/// without a session (to be reopened by the next attempt) and the
/// purchase attempt time the order took is given back.
async fn checkout(
    state: &AppState,
    provider: &Provider<'_>,
    buyer: &Buyer<'_>,
    order: order::Model,
    item: &Item<'_>,
    urls: (Option<&str>, Option<&str>),
    now: DateTime<Utc>,
) -> Result<Checkout> {
    let row = buyer.row;
    let session = match provider_checkout(state, provider, buyer, &order, item, urls).await {
        Ok(s) => s,
        Err(e) => {
            order::Entity::update_many()
                .col_expr(order::Column::Status, Expr::value(Status::Failed.as_str()))
                .col_expr(order::Column::UpdatedAt, Expr::value(now))
                .filter(order::Column::Id.eq(order.id.clone()))
                .filter(order::Column::Status.eq(Status::Pending.as_str()))
                .filter(order::Column::ProviderSessionId.is_null())
                .exec(&state.db)
                .await?;
            // Unless a later attempt took it meanwhile.
            organization::Entity::update_many()
                .col_expr(
                    organization::Column::LastPurchaseAttemptAt,
                    Expr::value(row.last_purchase_attempt_at),
                )
                .filter(organization::Column::Id.eq(row.id))
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

/// Buys a pack: rules, order, checkout.
pub async fn buy_pack(state: &AppState, req: BuyPack) -> Result<Checkout> {
    let pack = pack::Entity::find_by_id(req.pack_id.clone())
        .filter(pack::Column::Active.eq(true))
        .one(&state.db)
        .await?
        .ok_or(Error::PackNotFound)?;
    let provider = provider(state, req.channel)?;
    let item = Item {
        name: &pack.name,
        currency: &pack.currency,
        amount_cents: pack.price_cents,
        stripe_price: pack.stripe_price_id.as_deref(),
        creem_product: pack.creem_product_id.as_deref(),
        plan: None,
        discount_code: None,
    };
    item.check(req.channel)?;
    let now = state.clock.now();
    let org_id = state.ledger.ensure_org(&req.org).await?;
    let coupon = req.coupon.as_deref();
    let (order, row, applied) = open_order(state, org_id, &pack, req.channel, coupon, now).await?;
    let item = item.with_coupon(applied.as_ref(), order.amount_cents);
    let urls = (req.success_url.as_deref(), req.cancel_url.as_deref());
    let buyer = Buyer {
        org: &req.org,
        row: &row,
    };
    checkout(state, &provider, &buyer, order, &item, urls, now).await
}

/// A validated subscription checkout.
pub struct Subscribe {
    pub org: String,
    pub plan_id: String,
    pub period: Period,
    pub channel: Channel,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    /// A coupon code, as [`redeem::code`] gives it.
    pub coupon: Option<String>,
}

/// Opens a subscription checkout for a paid plan: `404 PLAN_NOT_FOUND`
/// for an unknown, inactive or free plan. The plan's Stripe price id for
/// the period is used when set, else an inline recurring price of the
/// plan's amount; Creem needs the plan's `creem_product_id`. An order
/// that a provider failure left `failed` for the same plan, period and
/// channel is reopened, like a pack's.
///
/// A coupon is claimed in the transaction that creates the order. On
/// Creem a discount coupon goes to Creem as its discount code (Creem
/// decides whether it applies to later periods); on Stripe only
/// `bonus_credits` coupons apply to subscriptions: a one-time discount on
/// a recurring price needs a coupon object at Stripe, which this service
/// does not manage, so a discount coupon there is `INVALID_COUPON`.
pub async fn subscribe(state: &AppState, req: Subscribe) -> Result<Checkout> {
    let plan = plan::Entity::find()
        .filter(
            Condition::any()
                .add(plan::Column::Id.eq(req.plan_id.as_str()))
                .add(plan::Column::Code.eq(req.plan_id.as_str())),
        )
        .filter(plan::Column::Active.eq(true))
        .one(&state.db)
        .await?
        .ok_or(Error::PlanNotFound)?;
    let amount_cents = match req.period {
        Period::Monthly => plan.price_monthly_cents,
        Period::Yearly => plan.price_yearly_cents,
    };
    if amount_cents <= 0 {
        return Err(Error::invalid(
            "plan_id",
            format!("plan `{}` is free: it needs no checkout", plan.code),
        ));
    }
    let provider = provider(state, req.channel)?;
    let item = Item {
        name: &plan.name,
        currency: &plan.currency,
        amount_cents,
        stripe_price: match req.period {
            Period::Monthly => plan.stripe_price_monthly.as_deref(),
            Period::Yearly => plan.stripe_price_yearly.as_deref(),
        },
        creem_product: plan.creem_product_id.as_deref(),
        plan: Some((&plan.id, req.period)),
        discount_code: None,
    };
    item.check(req.channel)?;
    let now = state.clock.now();
    let org_id = state.ledger.ensure_org(&req.org).await?;
    let row = organization::Entity::find_by_id(org_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal(format!("organization {org_id} vanished")))?;
    let txn = crate::db::begin_write(&state.db).await?;
    let applied = match req.coupon.as_deref() {
        Some(code) => Some(redeem::claim(&txn, code, amount_cents, now).await?),
        None => None,
    };
    if let Some(a) = applied.as_ref().filter(|a| a.is_discount())
        && req.channel == Channel::Stripe
    {
        return Err(Error::InvalidCoupon(format!(
            "coupon `{}` is a discount: on Stripe, discounts apply to packs only",
            a.code
        )));
    }
    let coupon_id = applied.as_ref().map(|a| a.coupon_id.clone());
    let reusable = order::Entity::find()
        .filter(order::Column::OrgId.eq(org_id))
        .filter(order::Column::Kind.eq("subscription"))
        .filter(order::Column::PlanId.eq(plan.id.as_str()))
        .filter(order::Column::BillingPeriod.eq(req.period.as_str()))
        .filter(order::Column::Channel.eq(req.channel.as_str()))
        .filter(order::Column::Status.eq(Status::Failed.as_str()))
        .filter(order::Column::ProviderSessionId.is_null())
        .filter(same_coupon(coupon_id.as_deref()))
        .one(&txn)
        .await?;
    let order = match reusable {
        Some(o) => {
            let reopened = order::Entity::update_many()
                .col_expr(order::Column::Status, Expr::value(Status::Pending.as_str()))
                .col_expr(order::Column::UpdatedAt, Expr::value(now))
                .filter(order::Column::Id.eq(o.id.clone()))
                .filter(order::Column::Status.eq(Status::Failed.as_str()))
                .exec(&txn)
                .await?;
            if reopened.rows_affected != 1 {
                return Err(Error::Unavailable(
                    "another checkout of this plan is starting; retry".into(),
                ));
            }
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
                kind: "subscription".into(),
                status: Status::Pending.as_str().into(),
                pack_id: None,
                plan_id: Some(plan.id.clone()),
                billing_period: Some(req.period.as_str().into()),
                amount_cents: applied.as_ref().map_or(amount_cents, |a| a.amount_cents),
                currency: plan.currency.clone(),
                channel: req.channel.as_str().into(),
                coupon_id,
                provider_session_id: None,
                provider_payment_id: None,
                provider_subscription_id: None,
                provider_invoice_id: None,
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
    let item = item.with_coupon(applied.as_ref(), order.amount_cents);
    let urls = (req.success_url.as_deref(), req.cancel_url.as_deref());
    let buyer = Buyer {
        org: &req.org,
        row: &row,
    };
    checkout(state, &provider, &buyer, order, &item, urls, now).await
}

/// A billing-portal link for the organization: the provider of its
/// subscription in force when it has one, else whichever provider knows
/// it as a customer (Stripe first); `400 NO_BILLING_ACCOUNT` when none
/// does.
pub async fn portal(state: &AppState, org: &str, return_url: Option<&str>) -> Result<String> {
    let Some(org_id) = state.ledger.org_id(org).await? else {
        return Err(Error::NoBillingAccount);
    };
    let row = organization::Entity::find_by_id(org_id)
        .one(&state.db)
        .await?
        .ok_or(Error::NoBillingAccount)?;
    let preferred = active_subscription(&state.db, org_id, state.clock.now())
        .await?
        .and_then(|(sub, _)| Channel::parse("channel", Some(&sub.channel)).ok());
    let stripe = row.stripe_customer_id.map(|c| (Channel::Stripe, c));
    let creem = row.creem_customer_id.map(|c| (Channel::Creem, c));
    let (channel, customer) = match preferred {
        Some(Channel::Creem) => creem.or(stripe),
        Some(Channel::Stripe) | None => stripe.or(creem),
    }
    .ok_or(Error::NoBillingAccount)?;
    match provider(state, channel)? {
        Provider::Stripe(stripe) => stripe.portal(&customer, return_url).await,
        Provider::Creem(creem) => creem.portal(&customer).await,
    }
}
