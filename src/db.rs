//! Database connection, migrations and first-run seeding.
//!
//! SQLite runs in WAL mode with a busy timeout and foreign keys on, so that
//! readers never block the writer and a writer waits rather than failing,
//! and with `synchronous=FULL`, so that an acknowledged write survives a
//! power loss, not only a crash of the process. One `billing serve` owns a
//! SQLite file ([`lock_sqlite_file`]): its ledger is the file's only writer,
//! which its balance cache relies on.
//! On PostgreSQL, migrations run inside one transaction holding an advisory
//! lock, so replicas starting together apply them once, in order.

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
    sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous},
};

/// Arbitrary, fixed key of the advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6269_6c6c_696e_6701;

/// The settings every pool on `url` needs: for SQLite WAL, a busy timeout
/// and foreign keys on each connection.
fn base_options(url: &str) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .acquire_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(10));
    if url.starts_with("sqlite:") {
        opts.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true)
        });
    }
    opts
}

/// Whether `err` is a lost or refused connection (the server restarted,
/// failed over, or terminated the session) rather than a statement's
/// failure: the transaction it was in is gone, and retrying on a new
/// connection is safe.
///
/// A server that is not (or not yet) the primary counts too: during a
/// failover a pooler can hand a new connection to a node still in recovery,
/// or to one being promoted; the statement fails before anything is
/// written, and the pooler closes sessions to a node it stops routing to.
pub fn is_connection_error(err: &DbErr) -> bool {
    if matches!(err, DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) {
        return true;
    }
    // By SQLSTATE: 08… connection_exception and its kin; 57P… admin_shutdown
    // (pg_terminate_backend, a server stopping), crash_shutdown,
    // cannot_connect_now; 25006 read_only_sql_transaction (a replica, not
    // the primary).
    if sqlstate(err).is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "25006") {
        return true;
    }
    // Failures that carry no SQLSTATE: the socket, the pool.
    let text = err.to_string().to_ascii_lowercase();
    [
        "terminating connection",
        "connection reset",
        "connection refused",
        "broken pipe",
        "unexpected eof",
        "pool timed out",
        "pool closed",
        "error communicating with database",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// The SQLSTATE of a database's error, if `err` is one.
pub fn sqlstate(err: &DbErr) -> Option<String> {
    let runtime = match err {
        DbErr::Conn(e) | DbErr::Exec(e) | DbErr::Query(e) => e,
        _ => return None,
    };
    match runtime {
        sea_orm::RuntimeErr::SqlxError(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned()),
        sea_orm::RuntimeErr::Internal(_) => None,
    }
}

/// The file of a SQLite `url` (`sqlite://path?…`, `sqlite:path`); `None`
/// for PostgreSQL and in-memory databases.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| path.into())
}

/// Makes this process the only `billing serve` on the SQLite file of
/// `url`: an exclusive lock on `<file>.lock`, held while the returned file
/// is open (the operating system releases it if the process dies). Another
/// process already holding it is an error that names `DATABASE_URL`.
pub fn lock_sqlite_file(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    let Some(path) = sqlite_path(url) else {
        return Ok(None);
    };
    let mut lock_path = path.into_os_string();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            anyhow::anyhow!(
                "DATABASE_URL: cannot open the lock file {}: {e}",
                std::path::Path::new(&lock_path).display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "DATABASE_URL: the SQLite database {url} is already served by another billing process \
             (one process per SQLite file; use PostgreSQL for several replicas)"
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!(
            "DATABASE_URL: cannot lock {}: {e}",
            std::path::Path::new(&lock_path).display()
        )),
    }
}

/// Opens the service's pool for `url` (reads, and everything but ledger
/// writes).
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    connect_sized(url, None).await
}

/// [`connect`] with `max` connections (default 8 on SQLite, 32 on
/// PostgreSQL).
pub async fn connect_sized(url: &str, max: Option<u32>) -> Result<DatabaseConnection, DbErr> {
    let mut opts = base_options(url);
    if url.starts_with("sqlite:") {
        opts.max_connections(max.unwrap_or(8));
    } else {
        let max = max.unwrap_or(32);
        opts.max_connections(max).min_connections(2.min(max));
    }
    Database::connect(opts).await
}

/// Connections of `db`'s pool: (in use, idle).
pub fn pool_use(db: &DatabaseConnection) -> (u32, u32) {
    let (size, idle) = match db.get_database_backend() {
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle())
        }
        DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle())
        }
        // The enum is non-exhaustive; this service opens no other backend.
        _ => (0, 0),
    };
    let idle = u32::try_from(idle).unwrap_or(u32::MAX);
    (size.saturating_sub(idle), idle)
}

/// A small pool for the ledger's writer thread: no ping before each
/// acquire (one round trip saved per transaction; a dead connection fails
/// the batch, which is retried).
pub async fn connect_writer(url: &str, connections: u32) -> Result<DatabaseConnection, DbErr> {
    let mut opts = base_options(url);
    opts.max_connections(connections)
        .min_connections(1)
        .test_before_acquire(false);
    Database::connect(opts).await
}

/// Starts a transaction that will write. On SQLite it takes the write
/// lock at `BEGIN` (`BEGIN IMMEDIATE`), waiting up to the busy timeout for
/// another writer: a deferred transaction that reads first and writes
/// later fails at once with "database is locked" when another connection
/// wrote in between, instead of waiting. On PostgreSQL it is a plain
/// `BEGIN`.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let txn = db.begin().await?;
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [MIGRATION_LOCK_KEY.into()],
            ))
            .await?;
            Migrator::up(&txn, None).await?;
            txn.commit().await
        }
        _ => Migrator::up(db, None).await,
    }
}

/// Connects, migrates and seeds the default catalog when it is empty.
pub async fn prepare(url: &str, max: Option<u32>) -> Result<DatabaseConnection, DbErr> {
    let db = connect_sized(url, max).await?;
    migrate(&db).await?;
    crate::catalog::seed_default_catalog(&db, chrono::Utc::now()).await?;
    Ok(db)
}

/// The URL of database `name` on the PostgreSQL server behind `url`:
/// same user, host and query parameters, another database (a scratch
/// database for tests or pgbench).
pub fn sibling_database_url(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    format!("{server}/{name}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sibling_database_keeps_the_server_and_its_parameters() {
        assert_eq!(
            sibling_database_url("postgres://u:p@h:5432/billing?sslmode=disable", "scratch"),
            "postgres://u:p@h:5432/scratch?sslmode=disable"
        );
        assert_eq!(
            sibling_database_url("postgres://u@127.0.0.1:5/postgres", "t_1"),
            "postgres://u@127.0.0.1:5/t_1"
        );
    }

    #[test]
    fn sqlite_paths_are_read_from_urls() {
        assert_eq!(
            sqlite_path("sqlite://billing.db?mode=rwc"),
            Some("billing.db".into())
        );
        assert_eq!(sqlite_path("sqlite:/tmp/x.db"), Some("/tmp/x.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://u@h/db"), None);
    }
}
