//! What every service function shares: the database, the configuration,
//! the clock and the ledger.

use std::sync::Arc;

use sea_orm::DatabaseConnection;

use crate::{
    clock::SharedClock,
    config::Config,
    error::Error,
    ledger::Ledger,
    payments::{creem::Creem, stripe::Stripe},
};

#[derive(Clone, Debug)]
pub struct AppState {
    /// The primary: every write, and every read that must see the
    /// caller's own writes.
    pub db: DatabaseConnection,
    /// Reads that may lag behind the primary by the replica's replay
    /// delay: ledger listings, monthly statistics, the public catalog and
    /// orders. `DATABASE_READ_URL` when set, else the primary.
    pub read_db: DatabaseConnection,
    pub config: Arc<Config>,
    pub clock: SharedClock,
    pub ledger: Ledger,
    /// Set when `STRIPE_SECRET_KEY` is.
    pub stripe: Option<Stripe>,
    /// The Creem client, when `CREEM_API_KEY` is set.
    pub creem: Option<Creem>,
}

impl AppState {
    /// CREDITS_NOT_ENABLED unless `SUBSCRIPTION_SYSTEM=credits`.
    pub fn require_credits(&self) -> Result<(), Error> {
        if self.config.credits_enabled() {
            Ok(())
        } else {
            Err(Error::CreditsNotEnabled)
        }
    }
}
