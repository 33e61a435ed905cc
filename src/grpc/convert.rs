//! Conversions from stored rows and domain values to wire messages.

use chrono::{DateTime, Utc};

use crate::{
    catalog::plan_features,
    entities::{admin_audit, coupon, order, pack, plan, rate},
    ledger::reads::TransactionRow,
    pb,
};

pub fn pack(p: pack::Model) -> pb::Pack {
    pb::Pack {
        id: p.id,
        name: p.name,
        code: p.code,
        credits: p.credits,
        price_cents: p.price_cents,
        currency: p.currency,
        active: p.active,
        limit_per_cycle: p.limit_per_cycle,
        lot_expiry_days: p.lot_expiry_days,
        stripe_price_id: p.stripe_price_id.unwrap_or_default(),
        creem_product_id: p.creem_product_id.unwrap_or_default(),
    }
}

pub fn plan(p: plan::Model) -> pb::Plan {
    let features = plan_features(&p);
    pb::Plan {
        id: p.id,
        code: p.code,
        name: p.name,
        description: p.description,
        tier: p.tier,
        price_monthly_cents: p.price_monthly_cents,
        price_yearly_cents: p.price_yearly_cents,
        currency: p.currency,
        credits_included: p.credits_included,
        features,
        active: p.active,
        stripe_price_monthly: p.stripe_price_monthly.unwrap_or_default(),
        stripe_price_yearly: p.stripe_price_yearly.unwrap_or_default(),
        creem_product_id: p.creem_product_id.unwrap_or_default(),
    }
}

pub fn rate(r: rate::Model) -> pb::Rate {
    pb::Rate {
        id: r.id,
        meter: r.meter,
        unit: r.unit,
        model: (!r.model.is_empty()).then_some(r.model),
        credits_per_unit_micros: r.credits_per_unit_micros,
        description: r.description,
        active: r.active,
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn transaction(t: TransactionRow) -> pb::Transaction {
    pb::Transaction {
        id: t.row.id,
        r#type: t.row.kind,
        amount_micros: t.row.amount_micros,
        balance_after_micros: t.row.balance_after_micros,
        description: t.row.description,
        created_at: Some(timestamp(t.row.created_at)),
        org_id: t.org,
    }
}

pub fn page_info(limit: u64, offset: u64, returned: usize, total: u64) -> pb::PageInfo {
    pb::PageInfo {
        limit: limit as i32,
        offset: offset as i32,
        total: total as i64,
        has_more: offset + (returned as u64) < total,
    }
}

/// An order; `org` is the organization's external id.
pub fn order(o: order::Model, org: &str) -> pb::Order {
    pb::Order {
        id: o.id,
        kind: o.kind,
        status: o.status,
        pack_id: o.pack_id,
        plan_id: o.plan_id,
        amount_cents: o.amount_cents,
        currency: o.currency,
        channel: o.channel,
        created_at: Some(timestamp(o.created_at)),
        paid_at: o.paid_at.map(timestamp),
        org_id: org.to_owned(),
    }
}

/// An audit entry; its details are `{target, before, after}` JSON.
pub fn audit_entry(a: admin_audit::Model) -> pb::AuditEntry {
    let details: serde_json::Value = serde_json::from_str(&a.details).unwrap_or_default();
    let text = |key: &str| details.get(key).cloned().unwrap_or_default().to_string();
    pb::AuditEntry {
        id: a.id,
        actor: a.actor_sub,
        action: a.action,
        org_id: a.target_org,
        target: details
            .get("target")
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .to_owned(),
        reason: a.reason,
        before_json: text("before"),
        after_json: text("after"),
        created_at: Some(timestamp(a.created_at)),
    }
}

pub fn coupon(c: coupon::Model) -> pb::Coupon {
    pb::Coupon {
        id: c.id,
        code: c.code,
        kind: c.kind,
        value: c.value,
        max_redemptions: c.max_redemptions,
        expires_at: c.expires_at.map(timestamp),
        active: c.active,
        redeemed_count: c.redeemed_count,
        created_at: Some(timestamp(c.created_at)),
    }
}
