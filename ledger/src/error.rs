//! Errors of the event store.

/// Store failures, split by what the caller should do about them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, restarting or overloaded: retry later.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// A concurrent writer stored the same event first: retry the batch now,
    /// it will be classified against what is now stored.
    #[error("concurrent write conflict: {0}")]
    Conflict(String),
    /// The database refused a value (SQLSTATE class 22, data exception):
    /// the row, not the database, is at fault.
    #[error("value refused by the database: {0}")]
    Data(String),
    /// Anything retrying will not fix (a schema mismatch, a bug).
    #[error("event store failed: {0}")]
    Fatal(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Conflict(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Io(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::Tls(_)
            | E::WorkerCrashed
            | E::Protocol(_) => Self::Unavailable(error.to_string()),
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let message = format!("{} (SQLSTATE {code})", db.message());
                match code.as_str() {
                    // unique_violation: another partition stored the same event_id meanwhile.
                    "23505" => Self::Conflict(message),
                    // serialization_failure, deadlock_detected
                    "40001" | "40P01" => Self::Conflict(message),
                    // data exceptions and check violations: the row is at fault
                    c if c.starts_with("22") || c == "23514" => Self::Data(message),
                    // connection exceptions, operator intervention (shutdown, restart),
                    // insufficient resources, crash recovery
                    c if c.starts_with("08")
                        || c.starts_with("57")
                        || c.starts_with("53")
                        || c.starts_with("58") =>
                    {
                        Self::Unavailable(message)
                    }
                    _ => Self::Fatal(message),
                }
            }
            _ => Self::Fatal(error.to_string()),
        }
    }
}
