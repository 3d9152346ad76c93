//! Test support: a throw-away database per test on the real PostgreSQL.
//!
//! Set `AUDIT_TEST_DATABASE_URL` to a server URL (its database part is
//! replaced); otherwise the local server's Unix socket is used.

use rand::Rng;

use crate::error::StoreError;
use crate::store::postgres::{create_database_if_missing, local_database_url, migrate};

/// A freshly created, migrated database with a random name. Dropped (best
/// effort) by [`TestDatabase::drop_database`]; leftovers are named
/// `audit_test_*` and harmless.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Result<Self, StoreError> {
        let suffix: u64 = rand::thread_rng().gen();
        let name = format!("audit_test_{suffix:016x}");
        let url = match std::env::var("AUDIT_TEST_DATABASE_URL") {
            Ok(base) => replace_database(&base, &name),
            Err(_) => local_database_url(&name),
        };
        create_database_if_missing(&url).await?;
        migrate(&url).await?;
        Ok(Self { name, url })
    }

    pub async fn drop_database(self) {
        crate::store::postgres::drop_database(&self.url).await;
    }
}

/// Plants a rule validation does not know about, as the database's owner:
/// `events` refuses a stream called `poison` (SQLSTATE 23514), the way a
/// value the database rejects reaches a batch that passed validation.
pub async fn plant_poison_rule(url: &str) -> Result<(), StoreError> {
    use sqlx::Connection;
    let mut owner =
        sqlx::PgConnection::connect_with(&crate::store::postgres::connect_options(url)?).await?;
    sqlx::query("ALTER TABLE events ADD CONSTRAINT planted CHECK (stream_id <> 'poison')")
        .execute(&mut owner)
        .await?;
    owner.close().await?;
    Ok(())
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
