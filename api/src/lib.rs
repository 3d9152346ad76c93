//! The HTTP API, served by a supervised actor. For now: liveness, readiness
//! and Prometheus metrics, with the OpenAPI document at `/openapi.json`.
//! Queries and replay come with the API issue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use audit_actors::supervisor::ChildSpec;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, Route};
use poem_openapi::payload::PlainText;
use poem_openapi::{ApiResponse, OpenApi, OpenApiService};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Checks the node's dependencies; `Err` says which one is not ready.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Clone)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    pub metrics: Option<PrometheusHandle>,
    pub readiness: ReadinessCheck,
    /// Receives the bound address (port 0 picks one).
    pub bound: Option<watch::Sender<Option<SocketAddr>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> PlainText<&'static str> {
        PlainText("ok")
    }

    /// Readiness: the database is reachable and the consumer is running.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> Readiness {
        match (self.readiness)().await {
            Ok(()) => Readiness::Ready(PlainText("ready".into())),
            Err(reason) => Readiness::NotReady(PlainText(reason)),
        }
    }

    /// Prometheus metrics in the text exposition format.
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        PlainText(
            self.metrics
                .as_ref()
                .map(PrometheusHandle::render)
                .unwrap_or_default(),
        )
    }
}

pub struct ApiActor;

pub struct ApiState {
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Actor for ApiActor {
    type Msg = ();
    type State = ApiState;
    type Arguments = ApiConfig;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        config: ApiConfig,
    ) -> Result<ApiState, ActorProcessingErr> {
        let api = HealthApi {
            metrics: config.metrics.clone(),
            readiness: config.readiness.clone(),
        };
        let service = OpenApiService::new(api, "order-audit-trail", env!("CARGO_PKG_VERSION"));
        let spec = service.spec_endpoint();
        let app = Route::new()
            .at("/openapi.json", spec)
            .nest("/", service)
            .boxed();
        let acceptor = TcpListener::bind(config.addr.to_string())
            .into_acceptor()
            .await
            .map_err(|source| ApiError::Bind {
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
        Ok(ApiState {
            shutdown: Some(tx),
            server: Some(server),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<()>,
        _msg: (),
        _state: &mut ApiState,
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<()>,
        state: &mut ApiState,
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
