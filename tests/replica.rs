//! `DATABASE_READ_URL` against a real streaming replica (PostgreSQL only;
//! `scripts/test` starts one beside its throwaway cluster and sets
//! `TEST_REPLICA_URL`).
//!
//! With the replica's replay paused, the service keeps answering: the
//! lag-tolerant reads (ledger listings, monthly statistics, orders, the
//! public catalog) show the replica's older state, while balances,
//! idempotent replays and every write see the primary. Once replay
//! resumes, the listings catch up.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use billing::{auth::Role, clock::SystemClock, pb};
use common::{Backend, TestDb, TestServer, authed, invariants, json_of};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use tonic::transport::Channel;

type R = Result<(), Box<dyn std::error::Error>>;
const CREDIT: i64 = 1_000_000;

/// The replica's URL for the database `name`, or `None` when no replica
/// was given (and none is required).
fn replica_url(name: &str) -> Option<String> {
    match std::env::var("TEST_REPLICA_URL") {
        Ok(url) if !url.is_empty() => {
            let (base, _) = url
                .rsplit_once('/')
                .expect("TEST_REPLICA_URL ends in /dbname");
            Some(format!("{base}/{name}"))
        }
        _ if std::env::var("PG_REPLICA").is_ok_and(|v| v == "1") => {
            panic!(
                "PG_REPLICA=1 but TEST_REPLICA_URL is not set: give a streaming replica of TEST_DATABASE_URL"
            )
        }
        _ => None,
    }
}

/// Waits up to 30 s for `check` to hold, polling; fails the test with
/// `what` otherwise. Returns how long it took.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not within 30 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

async fn replay_state(replica: &DatabaseConnection) -> String {
    replica
        .query_one_raw(sea_orm::Statement::from_string(
            replica.get_database_backend(),
            "SELECT pg_get_wal_replay_pause_state() AS s",
        ))
        .await
        .expect("pause state")
        .expect("a row")
        .try_get::<String>("", "s")
        .expect("text")
}

async fn transactions_total(
    credits: &mut pb::credits_service_client::CreditsServiceClient<Channel>,
    user: &str,
) -> i64 {
    credits
        .list_transactions(authed(user, pb::ListTransactionsRequest::default()))
        .await
        .expect("list transactions")
        .into_inner()
        .page
        .expect("page")
        .total
}

/// Waits until the listing shows `rows` rows (see [`eventually`]).
async fn listed(
    credits: &pb::credits_service_client::CreditsServiceClient<Channel>,
    user: &str,
    rows: i64,
    what: &str,
) -> Duration {
    eventually(what, || {
        let mut credits = credits.clone();
        async move { transactions_total(&mut credits, user).await == rows }
    })
    .await
}

async fn grants_this_month(
    credits: &mut pb::credits_service_client::CreditsServiceClient<Channel>,
    user: &str,
) -> i64 {
    credits
        .get_monthly_stats(authed(user, pb::GetMonthlyStatsRequest { months: Some(1) }))
        .await
        .expect("monthly stats")
        .into_inner()
        .totals
        .expect("totals")
        .grants_micros
}

fn grant(amount: i64, key: &str) -> pb::ManualAdjustRequest {
    pb::ManualAdjustRequest {
        org_id: "acme".into(),
        amount_micros: amount,
        reason: "replica test".into(),
        expires_at: None,
        idempotency_key: Some(key.into()),
    }
}

#[tokio::test]
async fn lag_tolerant_reads_go_to_the_replica_and_balance_changing_paths_stay_on_the_primary() -> R
{
    if std::env::var("TEST_DATABASE_URL").is_err() {
        eprintln!("skipped: no TEST_DATABASE_URL");
        return Ok(());
    }
    let db = TestDb::new(Backend::Postgres).await;
    let Some(read_url) = replica_url(db.name.as_deref().unwrap_or_default()) else {
        eprintln!("skipped: no TEST_REPLICA_URL");
        return Ok(());
    };
    let replica_admin = Database::connect(std::env::var("TEST_REPLICA_URL")?).await?;
    // The database was created on the primary; the replica has it once it
    // replays the creation.
    eventually("the test database reaches the replica", || async {
        Database::connect(&read_url).await.is_ok()
    })
    .await;

    let t = TestServer::start_in(
        Backend::Postgres,
        db,
        &[("DATABASE_READ_URL", read_url.as_str())],
        Arc::new(SystemClock),
    )
    .await;
    let admin = t.token(Role::Admin, "ops");
    let user = t.token(Role::User, "acme");
    let channel = t.channel().await;
    let mut admins = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    let mut credits = pb::credits_service_client::CreditsServiceClient::new(channel);
    let rest_rows = || {
        let request = t
            .http
            .get(t.rest("/credits/transactions"))
            .bearer_auth(&user);
        async move {
            let response = request.send().await;
            let (status, body) = json_of(response.expect("GET /credits/transactions"))
                .await
                .expect("a JSON body");
            assert_eq!(status, 200, "{body}");
            body["data"].as_array().map(Vec::len).unwrap_or(0)
        }
    };

    admins
        .manual_adjust(authed(&admin, grant(10 * CREDIT, "g1")))
        .await?;
    let lag = listed(
        &credits,
        &user,
        1,
        "the first grant is listed from the replica",
    )
    .await;
    eprintln!("an acknowledged grant was listed from the replica {lag:?} later");

    replica_admin
        .execute_unprepared("SELECT pg_wal_replay_pause()")
        .await?;
    eventually("the replica's replay pauses", || async {
        replay_state(&replica_admin).await == "paused"
    })
    .await;

    // Writes and the reads that must see them go to the primary.
    let second = admins
        .manual_adjust(authed(&admin, grant(5 * CREDIT, "g2")))
        .await?
        .into_inner();
    assert_eq!(second.balance_micros, 15 * CREDIT);
    let balance = credits
        .get_balance(authed(&user, pb::GetBalanceRequest {}))
        .await?
        .into_inner();
    assert_eq!(balance.balance_micros, 15 * CREDIT);
    // A debit the replica's state could not cover succeeds.
    let debit = admins
        .manual_adjust(authed(&admin, grant(-12 * CREDIT, "d1")))
        .await?
        .into_inner();
    assert_eq!(debit.balance_micros, 3 * CREDIT);
    // The replay of a key answers the first outcome, from the primary.
    let replay = admins
        .manual_adjust(authed(&admin, grant(5 * CREDIT, "g2")))
        .await?
        .into_inner();
    assert_eq!(replay.transaction_id, second.transaction_id);
    assert_eq!(replay.balance_micros, 15 * CREDIT);

    // The lag-tolerant reads show the replica's (paused) state.
    assert_eq!(transactions_total(&mut credits, &user).await, 1);
    assert_eq!(rest_rows().await, 1);
    assert_eq!(grants_this_month(&mut credits, &user).await, 10 * CREDIT);

    replica_admin
        .execute_unprepared("SELECT pg_wal_replay_resume()")
        .await?;
    let caught_up = listed(
        &credits,
        &user,
        3,
        "the listings catch up once replay resumes",
    )
    .await;
    eprintln!("replica caught up {caught_up:?} after replay resumed");
    assert_eq!(rest_rows().await, 3);
    assert_eq!(grants_this_month(&mut credits, &user).await, 15 * CREDIT);

    let primary = Database::connect(&t.db.url).await?;
    t.stop().await;
    invariants::check(&primary, chrono::Utc::now()).await;
    Ok(())
}
