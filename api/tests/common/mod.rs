//! Test harness: a throw-away PostgreSQL database, events written through
//! the real write path (field protection with a key file in a temp dir,
//! the default policy), and the API endpoint in-process (poem's
//! TestClient), with one token per role.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use audit_api::auth::{entry_for, generate_token, Role, TokenTable};
use audit_api::fold::Reducers;
use audit_api::state::{ApiDatabase, ApiLimits, ApiState};
use audit_ledger::protect::{LocalKeyFile, Policy};
use audit_ledger::store::conformance;
use audit_ledger::store::postgres::{PgConfig, PgEventStore};
use audit_ledger::store::protection::Protection;
use audit_ledger::testing::TestDatabase;
use audit_ledger::{OffsetKey, ParseOptions, PreparedBatch, WriteOutcome};
use poem::endpoint::BoxEndpoint;
use poem::http::{Method, StatusCode};
use poem::test::TestClient;
use poem::EndpointExt as _;
use rand::Rng as _;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

pub const TOPIC: &str = "orders";

pub struct Tokens {
    pub reader: String,
    pub auditor: String,
    pub admin: String,
}

impl Tokens {
    pub fn of(&self, role: Role) -> &str {
        match role {
            Role::Reader => &self.reader,
            Role::Auditor => &self.auditor,
            Role::Admin => &self.admin,
        }
    }
}

pub struct Fixture {
    pub db: TestDatabase,
    pub dir: PathBuf,
    pub protection: Arc<Protection>,
    pub writer: PgEventStore,
    /// The login role (superuser here): assertions and planted faults.
    pub owner: PgPool,
    pub state: Arc<ApiState>,
    pub client: TestClient<BoxEndpoint<'static>>,
    pub tokens: Tokens,
    offsets: Mutex<HashMap<i32, i64>>,
}

/// A response: status, content type, `WWW-Authenticate`, body as JSON (or
/// as a string when it is not JSON), and the raw text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub www_authenticate: Option<String>,
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// Asserts an RFC 9457 problem with this status; returns its detail.
    #[track_caller]
    pub fn assert_problem(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "{self:#?}");
        assert_eq!(self.content_type, "application/problem+json", "{self:#?}");
        assert_eq!(self.json["status"], status, "{self:#?}");
        assert_eq!(self.json["type"], "about:blank", "{self:#?}");
        assert!(self.json["title"].is_string(), "{self:#?}");
        let detail = self.json["detail"].as_str().unwrap_or_default().to_owned();
        assert!(!detail.is_empty(), "{self:#?}");
        detail
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "{self:#?}");
        &self.json
    }
}

pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "audit-api-test-{:012x}",
        rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `path?k=v&…`, URL-encoded.
pub fn url(path: &str, query: &[(&str, &str)]) -> String {
    if query.is_empty() {
        return path.to_owned();
    }
    format!(
        "{path}?{}",
        serde_urlencoded::to_string(query).expect("query encodes")
    )
}

impl Fixture {
    pub async fn new() -> Self {
        Self::with(ApiLimits::default(), Reducers::default()).await
    }

    pub async fn with(limits: ApiLimits, reducers: Reducers) -> Self {
        let db = TestDatabase::create().await.expect("test database");
        let dir = scratch_dir();
        let keys = LocalKeyFile::create(&dir.join("kek.json")).expect("key file");
        let protection = Arc::new(
            Protection::new(Policy::default_policy(), Arc::new(keys)).expect("protection"),
        );
        let writer = PgEventStore::connect(&PgConfig::new(&db.url))
            .await
            .expect("writer connects")
            .with_protection(protection.clone());
        let owner = PgEventStore::connect(&PgConfig {
            role: None,
            ..PgConfig::new(&db.url)
        })
        .await
        .expect("owner connects")
        .pool()
        .clone();
        let tokens = Tokens {
            reader: generate_token(),
            auditor: generate_token(),
            admin: generate_token(),
        };
        let table = TokenTable::from_entries(vec![
            entry_for("test-reader", Role::Reader, &tokens.reader),
            entry_for("test-auditor", Role::Auditor, &tokens.auditor),
            entry_for("test-admin", Role::Admin, &tokens.admin),
        ])
        .expect("tokens");
        let state = ApiState::connect(
            &ApiDatabase {
                url: db.url.clone(),
                max_connections: 4,
            },
            table,
            limits,
        )
        .await
        .expect("api state")
        .with_protection(protection.clone())
        .with_reducers(reducers);
        let state = Arc::new(state);
        let app = audit_api::app(state.clone(), None, audit_api::always_ready()).boxed();
        Self {
            db,
            dir,
            protection,
            writer,
            owner,
            state,
            client: TestClient::new(app),
            tokens,
            offsets: Mutex::new(HashMap::new()),
        }
    }

    pub async fn finish(self) {
        self.state.pool().close().await;
        self.writer.pool().close().await;
        self.owner.close().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.db.drop_database().await;
    }

    /// Writes one batch of envelopes to `partition` of [`TOPIC`] through
    /// the real write path (a JSON string is written as raw bytes).
    pub async fn write(&self, partition: i32, values: &[Value]) {
        write_batch(&self.writer, &self.offsets, partition, values).await;
        settle(&self.owner).await;
    }

    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Reply {
        let mut builder = self.client.request(method, uri.to_owned());
        if let Some(token) = token {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(body) = body {
            builder = builder.content_type("application/json").body(body);
        }
        let response = builder.send().await.0;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let www_authenticate = header("www-authenticate");
        let text = response
            .into_body()
            .into_string()
            .await
            .expect("body reads");
        let json = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
        Reply {
            status,
            content_type,
            www_authenticate,
            json,
            text,
        }
    }

    pub async fn get(&self, uri: &str, token: Option<&str>) -> Reply {
        self.request(Method::GET, uri, token, None).await
    }

    pub async fn get_as(&self, role: Role, uri: &str) -> Reply {
        self.get(uri, Some(self.tokens.of(role))).await
    }
}

/// Waits until every stored event and dead letter is below the read
/// horizon: pages show a row once every transaction older than its own has
/// finished, and other tests on the same server run transactions too.
pub async fn settle(pool: &PgPool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let visible: bool = sqlx::query_scalar(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) > greatest( \
             coalesce((SELECT tx FROM events ORDER BY tx DESC LIMIT 1), '0'::xid8), \
             coalesce((SELECT tx FROM dead_letters ORDER BY tx DESC LIMIT 1), '0'::xid8))",
        )
        .fetch_one(pool)
        .await
        .expect("horizon query");
        if visible {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stored rows did not become readable within 30 s (a long transaction on the server?)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Writes one batch with the expected offset tracked in `offsets`.
pub async fn write_batch(
    store: &PgEventStore,
    offsets: &Mutex<HashMap<i32, i64>>,
    partition: i32,
    values: &[Value],
) {
    let start = {
        let offsets = offsets.lock().unwrap();
        offsets.get(&partition).copied()
    };
    let first = start.unwrap_or(0);
    // A JSON string stands for raw record bytes (to make dead letters).
    let texts: Vec<String> = values
        .iter()
        .map(|v| match v {
            Value::String(raw) => raw.clone(),
            other => other.to_string(),
        })
        .collect();
    let records = texts
        .iter()
        .enumerate()
        .map(|(i, v)| conformance::record(TOPIC, partition, first + i as i64, v.as_bytes()))
        .collect();
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).expect("batch parses");
    let key = OffsetKey {
        group_id: "api-test".into(),
        topic: TOPIC.into(),
        partition,
    };
    let outcome = conformance::write(store, &key, start, &batch).await;
    assert!(
        matches!(outcome, WriteOutcome::Committed(_)),
        "write committed: {outcome:?}"
    );
    offsets
        .lock()
        .unwrap()
        .insert(partition, first + values.len() as i64);
}

/// A customer with personal data the default policy protects.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub email: String,
    pub phone: String,
}

impl Customer {
    pub fn new(n: u32) -> Self {
        Self {
            id: format!("customer-{n}"),
            name: format!("Person Nobody{n}"),
            email: format!("person.nobody{n}@example.test"),
            phone: format!("+44 7700 90{n:04}"),
        }
    }

    /// Every personal value, to search responses for.
    pub fn secrets(&self) -> Vec<String> {
        vec![self.name.clone(), self.email.clone(), self.phone.clone()]
    }
}

/// A native envelope of an order event.
pub fn order_event(
    stream: &str,
    version: i64,
    event_type: &str,
    occurred_at: &str,
    customer: &Customer,
    extra: Value,
) -> (Uuid, Value) {
    let id = Uuid::new_v4();
    let mut payload = json!({
        "customer": {
            "id": customer.id,
            "name": customer.name,
            "email": customer.email,
            "phone": customer.phone,
        },
    });
    if let (Some(p), Value::Object(extra)) = (payload.as_object_mut(), extra) {
        p.extend(extra);
    }
    let envelope = json!({
        "event_id": id,
        "event_type": event_type,
        "stream_id": stream,
        "stream_version": version,
        "occurred_at": occurred_at,
        "source": "shop",
        "correlation_id": Uuid::new_v4(),
        "payload": payload,
        "metadata": {"schema": 1},
    });
    (id, envelope)
}
