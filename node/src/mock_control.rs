//! `kafka-mock --control-addr`: a small HTTP API to inject faults into the
//! running mock cluster (broker down/up, round-trip time, request errors),
//! for the real-process fault suite (node/tests/faults.rs, docs/CHAOS.md).
//! Test tooling only: no authentication, bind it to loopback.

use std::net::SocketAddr;

use anyhow::Context as _;
use poem::http::StatusCode;
use poem::listener::TcpAcceptor;
use poem::web::{Data, Json, Path, Query};
use poem::{get, handler, post, EndpointExt as _, Route};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::mock::{resolve_api_key, resolve_error, ControlOp, MockControl};

/// Binds the control API; returns the bound address (port 0 allowed) and
/// the server future, which runs until `shutdown` resolves.
pub async fn bind(
    addr: SocketAddr,
    control: MockControl,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the mock control API on {addr}"))?;
    let local = listener
        .local_addr()
        .context("reading the mock control API's bound address")?;
    let acceptor = TcpAcceptor::from_tokio(listener).context("serving the mock control API")?;
    let app = routes().data(control);
    let server = tokio::spawn(async move {
        poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(app, shutdown, Some(std::time::Duration::from_secs(1)))
            .await
    });
    Ok((local, server))
}

fn routes() -> Route {
    Route::new()
        .at("/", get(info))
        .at("/brokers/:id/down", post(broker_down))
        .at("/brokers/:id/up", post(broker_up))
        .at("/brokers/:id/rtt", post(broker_rtt))
        .at(
            "/brokers/:id/request-errors",
            post(push_broker_errors).get(pending_broker_errors),
        )
        .at("/request-errors", post(push_errors).delete(clear_errors))
}

type Reply = poem::Result<Json<Value>>;

fn bad_request(message: String) -> poem::Error {
    poem::Error::from_string(message, StatusCode::BAD_REQUEST)
}

/// The request body as JSON, whatever its content type (so a bare
/// `curl -d '{…}'` works).
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> poem::Result<T> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

/// Runs `op` on the cluster's thread, off the async workers.
async fn apply(control: &MockControl, op: ControlOp) -> poem::Result<usize> {
    let control = control.clone();
    tokio::task::spawn_blocking(move || control.apply(op))
        .await
        .map_err(|e| poem::Error::from_string(e.to_string(), StatusCode::INTERNAL_SERVER_ERROR))?
        .map_err(bad_request)
}

#[handler]
async fn info(Data(control): Data<&MockControl>) -> Json<Value> {
    Json(json!({"bootstrap": control.bootstrap, "brokers": control.brokers}))
}

#[handler]
async fn broker_down(Path(id): Path<i32>, Data(control): Data<&MockControl>) -> Reply {
    apply(control, ControlOp::BrokerDown(id)).await?;
    Ok(Json(json!({"broker": id, "state": "down"})))
}

#[handler]
async fn broker_up(Path(id): Path<i32>, Data(control): Data<&MockControl>) -> Reply {
    apply(control, ControlOp::BrokerUp(id)).await?;
    Ok(Json(json!({"broker": id, "state": "up"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RttBody {
    rtt_ms: i32,
}

#[handler]
async fn broker_rtt(
    Path(id): Path<i32>,
    body: Vec<u8>,
    Data(control): Data<&MockControl>,
) -> Reply {
    let body: RttBody = json_body(&body)?;
    if body.rtt_ms < 0 {
        return Err(bad_request("rtt_ms must be >= 0".into()));
    }
    apply(
        control,
        ControlOp::BrokerRtt {
            broker: id,
            rtt_ms: body.rtt_ms,
        },
    )
    .await?;
    Ok(Json(json!({"broker": id, "rtt_ms": body.rtt_ms})))
}

/// `{"api": "Fetch", "errors": ["NOT_LEADER_FOR_PARTITION", 6], "rtt_ms": 0}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorsBody {
    api: Value,
    errors: Vec<Value>,
    #[serde(default)]
    rtt_ms: i32,
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl ErrorsBody {
    fn resolve(&self) -> poem::Result<(i16, Vec<rdkafka::bindings::rd_kafka_resp_err_t>)> {
        let api_key = resolve_api_key(&text(&self.api)).map_err(bad_request)?;
        let errors = self
            .errors
            .iter()
            .map(|e| resolve_error(&text(e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad_request)?;
        if errors.is_empty() {
            return Err(bad_request("errors must not be empty".into()));
        }
        Ok((api_key, errors))
    }
}

#[derive(Deserialize)]
struct ApiQuery {
    api: String,
}

#[handler]
async fn push_broker_errors(
    Path(id): Path<i32>,
    body: Vec<u8>,
    Data(control): Data<&MockControl>,
) -> Reply {
    let body: ErrorsBody = json_body(&body)?;
    let (api_key, errors) = body.resolve()?;
    let rtt_ms = body.rtt_ms.max(0);
    let pending = apply(
        control,
        ControlOp::PushBrokerErrors {
            broker: id,
            api_key,
            errors: errors.into_iter().map(|e| (e, rtt_ms)).collect(),
        },
    )
    .await?;
    Ok(Json(
        json!({"broker": id, "api_key": api_key, "pending": pending}),
    ))
}

#[handler]
async fn pending_broker_errors(
    Path(id): Path<i32>,
    Query(query): Query<ApiQuery>,
    Data(control): Data<&MockControl>,
) -> Reply {
    let api_key = resolve_api_key(&query.api).map_err(bad_request)?;
    let pending = apply(
        control,
        ControlOp::PendingBrokerErrors {
            broker: id,
            api_key,
        },
    )
    .await?;
    Ok(Json(
        json!({"broker": id, "api_key": api_key, "pending": pending}),
    ))
}

#[handler]
async fn push_errors(body: Vec<u8>, Data(control): Data<&MockControl>) -> Reply {
    let body: ErrorsBody = json_body(&body)?;
    let (api_key, errors) = body.resolve()?;
    let count = errors.len();
    apply(control, ControlOp::PushErrors { api_key, errors }).await?;
    Ok(Json(json!({"api_key": api_key, "pushed": count})))
}

#[handler]
async fn clear_errors(Query(query): Query<ApiQuery>, Data(control): Data<&MockControl>) -> Reply {
    let api_key = resolve_api_key(&query.api).map_err(bad_request)?;
    apply(control, ControlOp::ClearErrors { api_key }).await?;
    Ok(Json(json!({"api_key": api_key, "cleared": true})))
}
