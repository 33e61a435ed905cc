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
        AdjustInput, CommitInput, ConsumeInput, HoldAmount, Ledger, Op, Outcome, ReleaseInput,
        ReserveInput, reads, sweeper,
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
    /// Writes that reach the ledger together and run as one batch.
    Batch(Vec<Step>),
}

/// A write step (no clock jump, sweep or batch).
fn write_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2usize, 1..20i64, proptest::option::of(1..7200i64))
            .prop_map(|(org, credits, expires_in)| Step::Grant { org, credits, expires_in }),
        4 => (0..2usize, 1..6_000_000i64, 0..6u8).prop_map(|(org, tokens, key)| Step::Consume { org, tokens, key }),
        2 => (0..2usize, 1..10i64, 1..900i64, 0..6u8)
            .prop_map(|(org, credits, ttl, key)| Step::Reserve { org, credits, ttl, key }),
        2 => (0..8usize, 0..8_000_000i64).prop_map(|(pick, tokens)| Step::Commit { pick, tokens }),
        1 => (0..8usize).prop_map(|pick| Step::Release { pick }),
        1 => (0..2usize, 1..10i64).prop_map(|(org, credits)| Step::Debit { org, credits }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        13 => write_step(),
        2 => (1..3600i64).prop_map(|secs| Step::Advance { secs }),
        1 => Just(Step::Sweep),
        2 => proptest::collection::vec(write_step(), 2..8).prop_map(Step::Batch),
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
    reserve_keys: [HashMap<u8, (i64, i64)>; 2],
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

    /// Never below zero: lots can expire under holds.
    fn available(&self, org: usize, now: DateTime<Utc>) -> i64 {
        (self.stored(org, now) - self.held(org, now)).max(0)
    }

    /// The hold a commit or release picks among the first `holds`, with
    /// its id and organization, that organization swept; `None` if there
    /// is none to pick.
    fn pick_hold(
        &mut self,
        pick: usize,
        holds: usize,
        now: DateTime<Utc>,
    ) -> Option<(usize, String, usize)> {
        if holds == 0 {
            return None;
        }
        let i = pick % holds;
        let (id, org) = (self.holds[i].id.clone(), self.holds[i].org);
        self.sweep(org, now);
        Some((i, id, org))
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

/// The real answer to an operation, in the model's terms.
fn answer(result: Result<Outcome, Error>) -> Answer {
    match result {
        Ok(Outcome::Consume(o)) if o.duplicate => Answer::Duplicate,
        Ok(Outcome::Consume(o)) => Answer::Charged(o.charged_micros),
        Ok(Outcome::Reserve(o)) if o.duplicate => Answer::Duplicate,
        Ok(Outcome::Reserve(o)) => Answer::Held(o.held_micros),
        Ok(Outcome::Commit(o)) => Answer::Committed {
            charged: o.charged_micros,
            shortfall: o.shortfall_micros,
        },
        Ok(Outcome::Release(o)) => Answer::Released(o.released_micros),
        Ok(
            Outcome::Adjust(_)
            | Outcome::Grant(_)
            | Outcome::Settle(_)
            | Outcome::Void(_)
            | Outcome::TakeBack(_)
            | Outcome::Swept,
        ) => Answer::Done,
        Err(Error::InsufficientCredits { .. }) => Answer::Insufficient,
        Err(Error::IdempotencyKeyReused) => Answer::Reused,
        Err(Error::ReservationFinished { .. }) => Answer::Finished,
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

/// What the model expects of one write step, and the operation that asks
/// the ledger for it. `holds` is how many holds commits and releases may
/// pick from (those made before the current batch). A hold the model
/// makes gets its id from the ledger's answer: its index is returned.
fn plan(
    model: &mut Model,
    step: &Step,
    now: DateTime<Utc>,
    holds: usize,
) -> Option<(Op, Answer, Option<usize>)> {
    Some(match step.clone() {
        Step::Grant {
            org,
            credits,
            expires_in,
        } => {
            let expires_at = expires_in.map(|s| now + TimeDelta::seconds(s));
            model.sweep(org, now);
            model.grant(org, credits * CREDIT, expires_at);
            let op = Op::Adjust(AdjustInput {
                org: ORGS[org].into(),
                amount: credits * CREDIT,
                reason: "grant".into(),
                expires_at,
                key: None,
                actor: "prop".into(),
            });
            (op, Answer::Done, None)
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
            let op = Op::Consume(ConsumeInput {
                org: ORGS[org].into(),
                meter: Meter::AiTokens,
                quantity: tokens,
                model: None,
                key: format!("k{key}"),
                description: None,
            });
            (op, want, None)
        }
        Step::Reserve {
            org,
            credits,
            ttl,
            key,
        } => {
            let amount = credits * CREDIT;
            model.sweep(org, now);
            let mut made = None;
            let want = match model.reserve_keys[org].get(&key) {
                Some((a, t)) if (*a, *t) == (amount, ttl) => Answer::Duplicate,
                Some(_) => Answer::Reused,
                None if amount > model.available(org, now) => Answer::Insufficient,
                None => {
                    model.reserve_keys[org].insert(key, (amount, ttl));
                    made = Some(model.holds.len());
                    model.holds.push(MHold {
                        id: String::new(),
                        org,
                        amount,
                        expires_at: now + TimeDelta::seconds(ttl),
                        open: true,
                    });
                    Answer::Held(amount)
                }
            };
            let op = Op::Reserve(ReserveInput {
                org: ORGS[org].into(),
                amount: HoldAmount::Micros(amount),
                ttl_seconds: ttl,
                key: format!("r{key}"),
            });
            (op, want, made)
        }
        Step::Commit { pick, tokens } => {
            let (i, id, org) = model.pick_hold(pick, holds, now)?;
            let want = if model.holds[i].open {
                // The held part is charged as far as the stored balance
                // goes; any excess only from what nobody holds.
                let cost = 2 * tokens;
                let held_here = model.holds[i].amount;
                let stored = model.stored(org, now);
                let free = model.available(org, now);
                let charge = cost.min(held_here).min(stored) + (cost - held_here).max(0).min(free);
                model.holds[i].open = false;
                model.spend(org, charge);
                Answer::Committed {
                    charged: charge,
                    shortfall: cost - charge,
                }
            } else {
                Answer::Finished
            };
            let op = Op::Commit(CommitInput {
                reservation_id: id,
                meter: Meter::AiTokens,
                quantity: tokens,
                model: None,
                description: None,
                org: None,
            });
            (op, want, None)
        }
        Step::Release { pick } => {
            let (i, id, _) = model.pick_hold(pick, holds, now)?;
            let want = if model.holds[i].open {
                model.holds[i].open = false;
                Answer::Released(model.holds[i].amount)
            } else {
                Answer::Finished
            };
            let op = Op::Release(ReleaseInput {
                reservation_id: id,
                org: None,
            });
            (op, want, None)
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
            let op = Op::Adjust(AdjustInput {
                org: ORGS[org].into(),
                amount: -amount,
                reason: "debit".into(),
                expires_at: None,
                key: None,
                actor: "prop".into(),
            });
            (op, want, None)
        }
        Step::Advance { .. } | Step::Sweep | Step::Batch(_) => return None,
    })
}

async fn run_case(backend: Backend, steps: Vec<Step>) {
    let db = TestDb::new(backend).await;
    let conn = billing::db::prepare(&db.url, None).await.expect("database");
    let clock = ManualClock::new(DateTime::from_timestamp(1_800_000_000, 0).expect("time"));
    let stop = CancellationToken::new();
    let ledger = Ledger::start(
        conn.clone(),
        &db.url,
        Arc::new(clock.clone()),
        stop.clone(),
        billing::ledger::engine::DEFAULT_QUEUE_DEPTH,
        std::time::Duration::from_secs(30),
    )
    .await
    .expect("ledger");
    let mut model = Model::default();

    for (n, step) in steps.iter().enumerate() {
        let now = clock.now();
        match step {
            Step::Advance { secs } => clock.advance(TimeDelta::seconds(*secs)),
            Step::Sweep => {
                sweeper::sweep_all(&ledger).await.expect("sweep");
                for org in 0..ORGS.len() {
                    model.sweep(org, now);
                }
            }
            Step::Batch(_)
            | Step::Grant { .. }
            | Step::Consume { .. }
            | Step::Reserve { .. }
            | Step::Commit { .. }
            | Step::Release { .. }
            | Step::Debit { .. } => {
                let parts = match step {
                    Step::Batch(parts) => parts.clone(),
                    single => vec![single.clone()],
                };
                // Commits and releases in a batch pick among the holds made
                // before it (a hold made in the batch has no id yet).
                let holds = model.holds.len();
                let planned: Vec<_> = parts
                    .iter()
                    .filter_map(|part| plan(&mut model, part, now, holds))
                    .collect();
                if planned.is_empty() {
                    continue;
                }
                let ops = planned.iter().map(|(op, _, _)| op.clone()).collect();
                let results = ledger.submit_together(ops).await.expect("submitted");
                for ((_, want, made), result) in planned.into_iter().zip(results) {
                    if let (Some(i), Ok(Outcome::Reserve(o))) = (made, &result) {
                        model.holds[i].id = o.reservation_id.clone();
                    }
                    assert_eq!(answer(result), want, "step {n}: {step:?}");
                }
            }
        }

        let now = clock.now();
        let rows = invariants::rows_by_org(&conn).await;
        for (org, name) in ORGS.iter().enumerate() {
            let b = reads::balance(&ledger, name).await.expect("balance");
            let stored = model.stored(org, now);
            assert_eq!(
                (b.stored, b.realtime),
                (stored, model.held(org, now).min(stored)),
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

/// The sequence a review found: holds that outlive their lot. 10 credits
/// expiring in 5 s, held as 6 and 4; the lot expires; the first hold is
/// committed at its full cost, then the second; in between the org takes
/// other writes in the same batch.
#[test]
fn holds_that_outlive_their_lots() {
    let steps = vec![
        Step::Grant {
            org: 0,
            credits: 10,
            expires_in: Some(5),
        },
        Step::Reserve {
            org: 0,
            credits: 6,
            ttl: 600,
            key: 1,
        },
        Step::Reserve {
            org: 0,
            credits: 4,
            ttl: 600,
            key: 2,
        },
        Step::Advance { secs: 10 },
        Step::Batch(vec![
            Step::Commit {
                pick: 0,
                tokens: 3_000_000,
            },
            Step::Grant {
                org: 0,
                credits: 1,
                expires_in: None,
            },
            Step::Debit { org: 0, credits: 5 },
        ]),
        Step::Commit {
            pick: 1,
            tokens: 2_000_000,
        },
        Step::Consume {
            org: 0,
            tokens: 500_000,
            key: 1,
        },
        Step::Sweep,
    ];
    for backend in backends() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(run_case(backend, steps.clone()));
    }
}
