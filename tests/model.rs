//! Model-based property test of the ledger.
//!
//! Random sequences of grants, consumes, holds, commits, releases, debits,
//! clock jumps and sweeps run against the real ledger (real database,
//! injected clock) and against a small, independent model of the rules
//! written here. After every step the balances, the spendable lots (in
//! spend order) and the ledger must agree, and at the end every invariant
//! of CONTRACT §5 must hold in the database.

mod common;

use std::{collections::HashMap, sync::Arc};

use billing::{
    clock::{Clock, ManualClock},
    domain::Meter,
    error::Error,
    ledger::{
        AdjustInput, CommitInput, ConsumeInput, HoldAmount, Ledger, ReleaseInput, ReserveInput,
        reads, sweeper,
    },
};
use chrono::{DateTime, TimeDelta, Utc};
use common::{Backend, TestDb, backends, invariants};
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

const CREDIT: i64 = 1_000_000;
const ORGS: [&str; 2] = ["m-a", "m-b"];

#[derive(Debug, Clone)]
enum Step {
    Grant {
        org: usize,
        credits: i64,
        expires_in: Option<i64>,
    },
    Consume {
        org: usize,
        tokens: i64,
        key: u8,
    },
    Reserve {
        org: usize,
        credits: i64,
        ttl: i64,
        key: u8,
    },
    Commit {
        pick: usize,
        tokens: i64,
    },
    Release {
        pick: usize,
    },
    Debit {
        org: usize,
        credits: i64,
    },
    Advance {
        secs: i64,
    },
    Sweep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2usize, 1..20i64, proptest::option::of(1..7200i64))
            .prop_map(|(org, credits, expires_in)| Step::Grant { org, credits, expires_in }),
        4 => (0..2usize, 1..6_000_000i64, 0..6u8).prop_map(|(org, tokens, key)| Step::Consume { org, tokens, key }),
        2 => (0..2usize, 1..10i64, 1..900i64, 0..6u8)
            .prop_map(|(org, credits, ttl, key)| Step::Reserve { org, credits, ttl, key }),
        2 => (0..8usize, 0..8_000_000i64).prop_map(|(pick, tokens)| Step::Commit { pick, tokens }),
        1 => (0..8usize).prop_map(|pick| Step::Release { pick }),
        1 => (0..2usize, 1..10i64).prop_map(|(org, credits)| Step::Debit { org, credits }),
        2 => (1..3600i64).prop_map(|secs| Step::Advance { secs }),
        1 => Just(Step::Sweep),
    ]
}

#[derive(Debug, Clone)]
struct MLot {
    order: usize,
    remaining: i64,
    expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct MHold {
    id: String,
    org: usize,
    amount: i64,
    expires_at: DateTime<Utc>,
    open: bool,
}

/// The rules, written independently of `ledger::model`.
#[derive(Debug, Default)]
struct Model {
    lots: [Vec<MLot>; 2],
    ledger_sum: [i64; 2],
    ledger_rows: [usize; 2],
    holds: Vec<MHold>,
    next_order: usize,
    consume_keys: [HashMap<u8, i64>; 2],
    reserve_keys: [HashMap<u8, (i64, i64, String)>; 2],
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Charged(i64),
    Duplicate,
    Insufficient,
    Reused,
    Finished,
    Held(i64),
    Released(i64),
    Committed { charged: i64, shortfall: i64 },
    Done,
}

impl Model {
    fn live(&self, org: usize, now: DateTime<Utc>) -> impl Iterator<Item = &MLot> {
        self.lots[org]
            .iter()
            .filter(move |l| l.remaining > 0 && l.expires_at.is_none_or(|at| at > now))
    }

    fn stored(&self, org: usize, now: DateTime<Utc>) -> i64 {
        self.live(org, now).map(|l| l.remaining).sum()
    }

    fn held(&self, org: usize, now: DateTime<Utc>) -> i64 {
        self.holds
            .iter()
            .filter(|h| h.org == org && h.open && h.expires_at > now)
            .map(|h| h.amount)
            .sum()
    }

    fn available(&self, org: usize, now: DateTime<Utc>) -> i64 {
        self.stored(org, now) - self.held(org, now)
    }

    /// What every write does first for its organization.
    fn sweep(&mut self, org: usize, now: DateTime<Utc>) {
        for lot in &mut self.lots[org] {
            if lot.remaining > 0 && lot.expires_at.is_some_and(|at| at <= now) {
                self.ledger_sum[org] -= lot.remaining;
                self.ledger_rows[org] += 1;
                lot.remaining = 0;
            }
        }
        for h in &mut self.holds {
            if h.org == org && h.open && h.expires_at <= now {
                h.open = false;
            }
        }
    }

    /// Earliest expiry first, no expiry last, then oldest.
    fn spend(&mut self, org: usize, amount: i64) {
        let mut order: Vec<usize> = (0..self.lots[org].len()).collect();
        order.sort_by_key(|&i| {
            let l = &self.lots[org][i];
            (l.expires_at.is_none(), l.expires_at, l.order)
        });
        let mut left = amount;
        for i in order {
            let lot = &mut self.lots[org][i];
            if lot.remaining == 0 {
                continue;
            }
            let take = left.min(lot.remaining);
            lot.remaining -= take;
            left -= take;
        }
        assert_eq!(left, 0, "model overdrew");
        self.ledger_sum[org] -= amount;
        self.ledger_rows[org] += 1;
    }

    fn grant(&mut self, org: usize, amount: i64, expires_at: Option<DateTime<Utc>>) {
        self.lots[org].push(MLot {
            order: self.next_order,
            remaining: amount,
            expires_at,
        });
        self.next_order += 1;
        self.ledger_sum[org] += amount;
        self.ledger_rows[org] += 1;
    }
}

fn answer<T>(result: Result<T, Error>, ok: impl FnOnce(T) -> Answer) -> Answer {
    match result {
        Ok(v) => ok(v),
        Err(Error::InsufficientCredits { .. }) => Answer::Insufficient,
        Err(Error::IdempotencyKeyReused) => Answer::Reused,
        Err(Error::ReservationFinished(_)) => Answer::Finished,
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

async fn run_case(backend: Backend, steps: Vec<Step>) {
    let db = TestDb::new(backend).await;
    let conn = billing::db::prepare(&db.url).await.expect("database");
    let clock = ManualClock::new(DateTime::from_timestamp(1_800_000_000, 0).expect("time"));
    let stop = CancellationToken::new();
    let ledger = Ledger::start(conn.clone(), &db.url, Arc::new(clock.clone()), stop.clone())
        .await
        .expect("ledger");
    let mut model = Model::default();

    for (n, step) in steps.iter().enumerate() {
        let now = clock.now();
        let (got, want) = match step.clone() {
            Step::Grant {
                org,
                credits,
                expires_in,
            } => {
                let expires_at = expires_in.map(|s| now + TimeDelta::seconds(s));
                model.sweep(org, now);
                model.grant(org, credits * CREDIT, expires_at);
                let r = ledger
                    .adjust(AdjustInput {
                        org: ORGS[org].into(),
                        amount: credits * CREDIT,
                        reason: "grant".into(),
                        expires_at,
                        key: None,
                        actor: "prop".into(),
                    })
                    .await;
                (answer(r, |_| Answer::Done), Answer::Done)
            }
            Step::Consume { org, tokens, key } => {
                let cost = 2 * tokens; // default ai_tokens rate: 2 credits per 1M
                model.sweep(org, now);
                let want = match model.consume_keys[org].get(&key) {
                    Some(t) if *t == tokens => Answer::Duplicate,
                    Some(_) => Answer::Reused,
                    None if cost > model.available(org, now) => Answer::Insufficient,
                    None => {
                        model.consume_keys[org].insert(key, tokens);
                        model.spend(org, cost);
                        Answer::Charged(cost)
                    }
                };
                let r = ledger
                    .consume(ConsumeInput {
                        org: ORGS[org].into(),
                        meter: Meter::AiTokens,
                        quantity: tokens,
                        model: None,
                        key: format!("k{key}"),
                        description: None,
                    })
                    .await;
                (
                    answer(r, |o| {
                        if o.duplicate {
                            Answer::Duplicate
                        } else {
                            Answer::Charged(o.charged_micros)
                        }
                    }),
                    want,
                )
            }
            Step::Reserve {
                org,
                credits,
                ttl,
                key,
            } => {
                let amount = credits * CREDIT;
                model.sweep(org, now);
                let r = ledger
                    .reserve(ReserveInput {
                        org: ORGS[org].into(),
                        amount: HoldAmount::Micros(amount),
                        ttl_seconds: ttl,
                        key: format!("r{key}"),
                    })
                    .await;
                let want = match model.reserve_keys[org].get(&key) {
                    Some((a, t, _)) if (*a, *t) == (amount, ttl) => Answer::Duplicate,
                    Some(_) => Answer::Reused,
                    None if amount > model.available(org, now) => Answer::Insufficient,
                    None => Answer::Held(amount),
                };
                let got = answer(r, |o| {
                    if o.duplicate {
                        Answer::Duplicate
                    } else {
                        if want == Answer::Held(amount) {
                            model.reserve_keys[org]
                                .insert(key, (amount, ttl, o.reservation_id.clone()));
                            model.holds.push(MHold {
                                id: o.reservation_id,
                                org,
                                amount,
                                expires_at: now + TimeDelta::seconds(ttl),
                                open: true,
                            });
                        }
                        Answer::Held(o.held_micros)
                    }
                });
                (got, want)
            }
            Step::Commit { pick, tokens } => {
                if model.holds.is_empty() {
                    continue;
                }
                let i = pick % model.holds.len();
                let (id, org) = (model.holds[i].id.clone(), model.holds[i].org);
                model.sweep(org, now);
                let want = if model.holds[i].open {
                    model.holds[i].open = false;
                    let cost = 2 * tokens;
                    let charge = cost.min(model.available(org, now).max(0));
                    model.spend(org, charge);
                    Answer::Committed {
                        charged: charge,
                        shortfall: cost - charge,
                    }
                } else {
                    Answer::Finished
                };
                let r = ledger
                    .commit(CommitInput {
                        reservation_id: id,
                        meter: Meter::AiTokens,
                        quantity: tokens,
                        model: None,
                        description: None,
                        org: None,
                    })
                    .await;
                (
                    answer(r, |o| Answer::Committed {
                        charged: o.charged_micros,
                        shortfall: o.shortfall_micros,
                    }),
                    want,
                )
            }
            Step::Release { pick } => {
                if model.holds.is_empty() {
                    continue;
                }
                let i = pick % model.holds.len();
                let (id, org) = (model.holds[i].id.clone(), model.holds[i].org);
                model.sweep(org, now);
                let want = if model.holds[i].open {
                    model.holds[i].open = false;
                    Answer::Released(model.holds[i].amount)
                } else {
                    Answer::Finished
                };
                let r = ledger
                    .release(ReleaseInput {
                        reservation_id: id,
                        org: None,
                    })
                    .await;
                (answer(r, |o| Answer::Released(o.released_micros)), want)
            }
            Step::Debit { org, credits } => {
                let amount = credits * CREDIT;
                model.sweep(org, now);
                let want = if amount > model.available(org, now) {
                    Answer::Insufficient
                } else {
                    model.spend(org, amount);
                    Answer::Done
                };
                let r = ledger
                    .adjust(AdjustInput {
                        org: ORGS[org].into(),
                        amount: -amount,
                        reason: "debit".into(),
                        expires_at: None,
                        key: None,
                        actor: "prop".into(),
                    })
                    .await;
                (answer(r, |_| Answer::Done), want)
            }
            Step::Advance { secs } => {
                clock.advance(TimeDelta::seconds(secs));
                (Answer::Done, Answer::Done)
            }
            Step::Sweep => {
                sweeper::sweep_all(&ledger).await.expect("sweep");
                for org in 0..ORGS.len() {
                    model.sweep(org, now);
                }
                (Answer::Done, Answer::Done)
            }
        };
        assert_eq!(got, want, "step {n}: {step:?}");

        let now = clock.now();
        let rows = invariants::rows_by_org(&conn).await;
        for (org, name) in ORGS.iter().enumerate() {
            let b = reads::balance(&ledger, name).await.expect("balance");
            assert_eq!(
                (b.stored, b.realtime),
                (model.stored(org, now), model.held(org, now)),
                "step {n} {step:?}: balance of {name}"
            );
            let info = reads::credit_info(&ledger, name).await.expect("info");
            let real: Vec<i64> = info.lots.iter().map(|l| l.remaining).collect();
            let mut expected: Vec<&MLot> = model.live(org, now).collect();
            expected.sort_by_key(|l| (l.expires_at.is_none(), l.expires_at, l.order));
            let expected: Vec<i64> = expected.iter().map(|l| l.remaining).collect();
            assert_eq!(real, expected, "step {n} {step:?}: lots of {name}");
            let org_rows = rows.get(*name).map(Vec::as_slice).unwrap_or_default();
            assert_eq!(
                org_rows.len(),
                model.ledger_rows[org],
                "step {n} {step:?}: ledger rows of {name}"
            );
            assert_eq!(
                org_rows.iter().map(|r| r.amount_micros).sum::<i64>(),
                model.ledger_sum[org],
                "step {n} {step:?}: ledger sum of {name}"
            );
        }
    }
    sweeper::sweep_all(&ledger).await.expect("sweep");
    invariants::check(&conn, clock.now()).await;
    stop.cancel();
}

fn cases(backend: Backend) -> u32 {
    match backend {
        Backend::Sqlite => 40,
        Backend::Postgres => 12,
    }
}

#[test]
fn ledger_matches_the_model() {
    for backend in backends() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let config = ProptestConfig {
            cases: cases(backend),
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(steps in proptest::collection::vec(step(), 1..45))| {
            runtime.block_on(run_case(backend, steps));
        });
    }
}
