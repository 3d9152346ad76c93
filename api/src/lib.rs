//! The HTTP API, served by a supervised actor: events, streams and their
//! state, dead letters, erasure, the access log, and liveness, readiness
//! and Prometheus metrics; the OpenAPI document at `/openapi.json`, Swagger
//! UI at `/docs`.
//!
//! The foundation every route builds on:
//! - [`state::ApiState`]: the API's pool (role `audit_api`, statement
//!   timeout), field protection, checkpointer, tokens, limits;
//! - [`auth`]: bearer tokens and roles ([`auth::BearerAuth`],
//!   [`auth::Caller::require`]);
//! - [`problem`]: errors as `application/problem+json` ([`problem::ApiError`]);
//! - [`filters`]: query parameters to an `audit_ledger::query::EventFilter`,
//!   cursors, page limits;
//! - [`disclose`]: redaction, or decryption with an audited read;
//! - [`render`]: redacted events from rows straight to JSON text.

pub mod access_log;
pub mod auth;
pub mod body;
pub mod dead_letters;
pub mod disclose;
pub mod events;
pub mod filters;
pub mod fold;
pub mod jobs;
pub mod problem;
pub mod proofs;
pub mod render;
pub mod replay;
pub mod state;
pub mod subjects;
mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use audit_actors::supervisor::ChildSpec;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{Endpoint, EndpointExt, IntoEndpoint, Response, Route};
use poem_openapi::payload::PlainText;
use poem_openapi::{ApiResponse, OpenApi, OpenApiService, Tags};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use crate::state::ApiState;

/// Checks the node's dependencies; `Err` says which one is not ready.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Groups of routes in the OpenAPI document.
#[derive(Tags)]
pub enum ApiTags {
    /// Liveness, readiness, metrics (no token needed).
    Health,
    /// Events: filtered pages and single events.
    Events,
    /// Streams (aggregates): their events and their state at a point in time.
    Streams,
    /// Records that could not become events.
    DeadLetters,
    /// Data subjects: erasure.
    Subjects,
    /// Who read decrypted personal data.
    AccessLog,
}

#[derive(Clone)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    pub metrics: Option<PrometheusHandle>,
    pub readiness: ReadinessCheck,
    /// Receives the bound address (port 0 picks one).
    pub bound: Option<watch::Sender<Option<SocketAddr>>>,
    /// What the routes share (pool, protection, tokens, limits).
    pub state: Arc<ApiState>,
}

/// Why the API actor could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error("cannot listen on {addr}: {source}; choose another --api-addr (AUDIT_API_ADDR)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct HealthApi {
    metrics: Option<PrometheusHandle>,
    readiness: ReadinessCheck,
}

impl HealthApi {
    /// For the OpenAPI document only.
    fn detached() -> Self {
        Self {
            metrics: None,
            readiness: always_ready(),
        }
    }
}

/// A readiness check that always passes (tests, the spec).
pub fn always_ready() -> ReadinessCheck {
    Arc::new(|| Box::pin(async { Ok(()) }))
}

#[derive(ApiResponse)]
enum Readiness {
    /// The database answers and the Kafka consumer runs.
    #[oai(status = 200)]
    Ready(PlainText<String>),
    /// A dependency is not ready; the body says which.
    #[oai(status = 503)]
    NotReady(PlainText<String>),
}

#[OpenApi]
impl HealthApi {
    /// Liveness: the process serves HTTP.
    #[oai(
        path = "/healthz",
        method = "get",
        tag = "ApiTags::Health",
        operation_id = "healthz"
    )]
    async fn healthz(&self) -> PlainText<&'static str> {
        PlainText("ok")
    }

    /// Readiness: the database is reachable and the consumer is running.
    #[oai(
        path = "/readyz",
        method = "get",
        tag = "ApiTags::Health",
        operation_id = "readyz"
    )]
    async fn readyz(&self) -> Readiness {
        match (self.readiness)().await {
            Ok(()) => Readiness::Ready(PlainText("ready".into())),
            Err(reason) => Readiness::NotReady(PlainText(reason)),
        }
    }

    /// Prometheus metrics in the text exposition format.
    #[oai(
        path = "/metrics",
        method = "get",
        tag = "ApiTags::Health",
        operation_id = "metrics"
    )]
    async fn metrics(&self) -> PlainText<String> {
        PlainText(
            self.metrics
                .as_ref()
                .map(PrometheusHandle::render)
                .unwrap_or_default(),
        )
    }
}

/// Every route, for serving and for the document.
fn service(health: HealthApi) -> OpenApiService<impl OpenApi, ()> {
    OpenApiService::new(
        (
            health,
            events::EventsApi,
            dead_letters::DeadLettersApi,
            subjects::SubjectsApi,
            access_log::AccessLogApi,
            replay::ReplayApi,
            jobs::JobsApi,
            proofs::ProofsApi,
        ),
        "order-audit-trail",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Query API of the order audit trail: an immutable, verifiable history of business events. \
         Every route except /healthz, /readyz, /metrics, /openapi.json and /docs needs \
         `Authorization: Bearer <token>`; roles are reader < auditor < admin. \
         Errors are RFC 9457 problems (application/problem+json). Times are RFC 3339.",
    )
}

/// The OpenAPI document the node serves at `/openapi.json`
/// (`audit-node openapi` prints it; docs/openapi.json is a copy).
pub fn openapi_json() -> String {
    service(HealthApi::detached()).spec()
}

/// The whole HTTP application: routes, `/openapi.json`, `/docs`, and the
/// middleware (problem errors, body limit, request logs).
pub fn app(
    state: Arc<ApiState>,
    metrics: Option<PrometheusHandle>,
    readiness: ReadinessCheck,
) -> impl Endpoint<Output = Response> {
    let service = service(HealthApi { metrics, readiness });
    let spec = service.spec_endpoint();
    let docs = service.swagger_ui();
    let max_body = state.limits().max_body_bytes;
    Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", service)
        .data(state)
        .around(move |next, req| body::limit_body(next, req, max_body))
        .around(problem::problem_errors)
        .around(telemetry::log_requests)
        .into_endpoint()
        .map_to_response()
}

pub struct ApiActor;

pub struct ApiActorState {
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Actor for ApiActor {
    type Msg = ();
    type State = ApiActorState;
    type Arguments = ApiConfig;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        config: ApiConfig,
    ) -> Result<ApiActorState, ActorProcessingErr> {
        let app = app(
            config.state.clone(),
            config.metrics.clone(),
            config.readiness.clone(),
        );
        let acceptor = TcpListener::bind(config.addr.to_string())
            .into_acceptor()
            .await
            .map_err(|source| ApiStartError::Bind {
                addr: config.addr,
                source,
            })?;
        let local = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .unwrap_or(config.addr);
        if let Some(bound) = &config.bound {
            let _ = bound.send(Some(local));
        }
        tracing::info!(addr = %local, "API listening");
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    async move {
                        let _ = rx.await;
                    },
                    Some(Duration::from_secs(5)),
                )
                .await
        });
        Ok(ApiActorState {
            shutdown: Some(tx),
            server: Some(server),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<()>,
        _msg: (),
        _state: &mut ApiActorState,
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<()>,
        state: &mut ApiActorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(tx) = state.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = state.server.take() {
            let _ = server.await;
        }
        Ok(())
    }
}

/// Starts the API actor under the node supervisor.
pub struct ApiSpec(pub ApiConfig);

pub const API_CHILD: &str = "api";

#[async_trait]
impl ChildSpec for ApiSpec {
    fn name(&self) -> &str {
        API_CHILD
    }

    async fn spawn(&self, supervisor: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
        let (actor, _join) = Actor::spawn_linked(None, ApiActor, self.0.clone(), supervisor)
            .await
            .map_err(audit_actors::supervisor::startup_error)?;
        Ok(actor.get_cell())
    }
}
