//! What every service function shares: the database, the configuration and
//! the clock.

use std::sync::Arc;

use sea_orm::DatabaseConnection;

use crate::{clock::SharedClock, config::Config};

#[derive(Clone, Debug)]
pub struct AppState {
    pub db: DatabaseConnection,
    pub config: Arc<Config>,
    pub clock: SharedClock,
}
