//! `GET /v1/replay`: the events matching the filters of `GET /v1/events`,
//! streamed in `(tx, seq)` order, as NDJSON or as server-sent events, from
//! a cursor on; with `follow=true` it goes on as a live tail.
//!
//! - **Order, no gap, no duplicate.** The stream is a sequence of keyset
//!   pages after the last position sent, each bounded by the snapshot
//!   horizon (`audit_ledger::query`, migration `…04_query_api.sql`): an
//!   event that commits later can never sort before a position already
//!   sent, so catch-up and live tail are one loop and nothing is skipped or
//!   repeated between them. Without `follow`, the stream ends at the
//!   horizon taken when it started (the events readable then).
//! - **Fast.** Rows are written straight to bytes: the JSON columns are
//!   copied as PostgreSQL prints them, and protected fields are redacted
//!   on that text ([`crate::render`]), so no event becomes a
//!   `serde_json::Value` on the way.
//! - **Bounded.** A producer task per stream fetches pages of
//!   [`REPLAY_PAGE`] events into a channel of [`CHANNEL_PAGES`] chunks: it
//!   runs at most that far ahead of the client, and stops when the client
//!   goes away (a send fails, or the channel closes while it waits) or
//!   reads nothing for [`STALL_TIMEOUT`]. The stream holds one of the
//!   node's replay permits (`ApiState`) until then. A stream that stops
//!   before its end is cut off (no final chunk), never ended cleanly.
//! - **Readers only see redacted fields.** Decryption is not offered here:
//!   a bulk stream of plaintext would defeat the per-read purpose of the
//!   access log. Auditors read decrypted events page by page with
//!   `GET /v1/events?decrypt=true&purpose=…`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use audit_ledger::query::{self, EventFilter, PageQuery, Position, QueryError};
use chrono::{DateTime, Utc};
use poem::http::{header, StatusCode};
use poem::web::Data;
use poem::{Body, IntoResponse, Request, Response};
use poem_openapi::param::{Header, Query};
use poem_openapi::registry::{
    MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sqlx::postgres::PgRow;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use uuid::Uuid;

use crate::auth::{BearerAuth, Role};
use crate::disclose::EventView;
use crate::filters::{self, FilterParams};
use crate::problem::{ApiError, Problem};
use crate::render::{row_position, write_event_fields, JsonObject, EVENT_COLUMNS};
use crate::state::ApiState;

/// Events per page fetched for a stream.
pub const REPLAY_PAGE: i64 = 2000;
/// Encoded pages a stream's producer may hold ahead of its client.
pub const CHANNEL_PAGES: usize = 2;
/// How often a caught-up live tail asks for new events.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Idle time after which a live tail sends a keep-alive (which is also how
/// a client that went away is noticed).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long a stream waits for a client that reads nothing before giving
/// up its slot.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

pub const NDJSON: &str = "application/x-ndjson";
pub const EVENT_STREAM: &str = "text/event-stream";

/// Route-specific parameters besides the filters.
const ROUTE_PARAMS: &[&str] = &["cursor", "follow"];

/// Groups of routes of this module in the OpenAPI document.
#[derive(Tags)]
pub enum ReplayTags {
    /// Streaming replay and live tail of events (NDJSON or server-sent events).
    Replay,
}

/// One line of an NDJSON replay (or the `data` of one server-sent event):
/// the event as `GET /v1/events` shows it, plus its cursor.
#[derive(Debug, Clone, Object)]
pub struct ReplayEvent {
    /// Pass as `cursor` (or, for SSE, it is the event's `id`, sent back as
    /// `Last-Event-ID`) to resume right after this event.
    pub cursor: String,
    #[oai(flatten)]
    pub event: EventView,
}

/// How the stream is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Sse,
}

impl Format {
    /// Server-sent events when the client accepts `text/event-stream`.
    pub fn from_request(req: &Request) -> Self {
        let accepts_sse = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(EVENT_STREAM));
        if accepts_sse {
            Self::Sse
        } else {
            Self::Ndjson
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Ndjson => NDJSON,
            Self::Sse => EVENT_STREAM,
        }
    }
}

/// The streamed response: NDJSON or `text/event-stream`, both declared in
/// the OpenAPI document under one 200.
pub struct ReplayStream {
    format: Format,
    body: Body,
}

impl IntoResponse for ReplayStream {
    fn into_response(self) -> Response {
        Response::builder()
            .status(StatusCode::OK)
            .content_type(self.format.content_type())
            .header(header::CACHE_CONTROL, "no-cache")
            // Proxies (nginx) must not buffer a live tail.
            .header("X-Accel-Buffering", "no")
            .body(self.body)
    }
}

impl ApiResponse for ReplayStream {
    fn meta() -> MetaResponses {
        use poem_openapi::types::Type as _;
        MetaResponses {
            responses: vec![MetaResponse {
                description:
                    "The matching events in order: NDJSON (one `ReplayEvent` per line) by \
                    default; with `Accept: text/event-stream`, server-sent events (`id: <cursor>`, \
                    `event: event`, `data: <ReplayEvent>`).",
                status: Some(200),
                status_range: None,
                content: vec![
                    MetaMediaType {
                        content_type: NDJSON,
                        schema: ReplayEvent::schema_ref(),
                    },
                    MetaMediaType {
                        content_type: EVENT_STREAM,
                        schema: MetaSchemaRef::Inline(Box::new(MetaSchema {
                            description: Some(
                                "Server-sent events; each `data` is a ReplayEvent as JSON.",
                            ),
                            ..MetaSchema::new("string")
                        })),
                    },
                ],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        use poem_openapi::types::Type as _;
        ReplayEvent::register(registry);
    }
}

pub struct ReplayApi;

#[OpenApi]
impl ReplayApi {
    /// Streams the events matching the filters of `GET /v1/events`, in
    /// store order, from `cursor` on.
    ///
    /// **Formats.** NDJSON (`application/x-ndjson`, the default): one
    /// `ReplayEvent` per line, the event as `GET /v1/events` shows it plus
    /// its `cursor`. Server-sent events with `Accept: text/event-stream`:
    /// each event as `id: <cursor>`, `event: event`, `data: <ReplayEvent>`;
    /// without `follow` the stream closes with `event: end`.
    ///
    /// **Resume.** Pass the `cursor` of the last event received as `cursor`
    /// (NDJSON), or let the SSE client send it back as `Last-Event-ID`
    /// (which wins over `cursor`). Nothing before it, and nothing twice, is
    /// sent again.
    ///
    /// **Live tail.** Without `follow`, the stream ends after the events
    /// readable when it started. With `follow=true` it goes on with newly
    /// ingested events as they become readable, with no gap and no
    /// duplicate between catch-up and live; while idle it sends a keep-alive
    /// every 15 s (an SSE comment, or an empty NDJSON line: skip empty
    /// lines). If reading fails mid-stream, an SSE stream sends
    /// `event: error` with a problem object and closes; an NDJSON stream
    /// is cut off without its final chunk. Either way, resume from the last
    /// cursor.
    ///
    /// **Limits.** Protected fields are always `{"$redacted": true}`:
    /// decryption is not offered on replay (auditors read decrypted events
    /// with `GET /v1/events?decrypt=true&purpose=…`, which is audited). A
    /// node serves a limited number of concurrent streams (429 beyond).
    #[oai(
        path = "/v1/replay",
        method = "get",
        tag = "ReplayTags::Replay",
        operation_id = "replay_events"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn replay(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        req: &Request,
        /// Only events of this stream (aggregate).
        #[oai(validator(min_length = 1))]
        stream_id: Query<Option<String>>,
        /// Event type: exact (`order.created`) or prefix (`order.*`); repeat for any of several.
        #[oai(default)]
        event_type: Query<Vec<String>>,
        /// Only events from this source.
        #[oai(validator(min_length = 1))]
        source: Query<Option<String>>,
        correlation_id: Query<Option<Uuid>>,
        causation_id: Query<Option<Uuid>>,
        /// `occurred_at >= occurred_from` (RFC 3339).
        occurred_from: Query<Option<DateTime<Utc>>>,
        /// `occurred_at < occurred_to` (RFC 3339).
        occurred_to: Query<Option<DateTime<Utc>>>,
        /// `ingested_at >= ingested_from` (RFC 3339).
        ingested_from: Query<Option<DateTime<Utc>>>,
        /// `ingested_at < ingested_to` (RFC 3339).
        ingested_to: Query<Option<DateTime<Utc>>>,
        /// A JSON object the payload must contain (`{"status":"paid"}`); protected fields never match by value.
        #[oai(validator(min_length = 1))]
        contains: Query<Option<String>>,
        /// Blind-index equality on the protected customer email (when the policy has the `email` index; other indexes work alike).
        #[oai(validator(min_length = 1))]
        email: Query<Option<String>>,
        /// The `cursor` of the last event received: resume right after it.
        #[oai(validator(min_length = 1))]
        cursor: Query<Option<String>>,
        /// Go on as a live tail of newly ingested events (default false).
        follow: Query<Option<bool>>,
        /// SSE resume: the `id` of the last event received (wins over `cursor`).
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<ReplayStream, ApiError> {
        let caller = auth.0;
        caller.require(Role::Reader, "replaying events")?;
        // Declared for the document; read from the raw query like every blind index.
        let _ = email;
        refuse_decrypt(req.uri().query())?;
        let filter = filters::event_filter(
            &state,
            FilterParams {
                stream_id: stream_id.0,
                event_type: event_type.0,
                source: source.0,
                correlation_id: correlation_id.0,
                causation_id: causation_id.0,
                occurred_from: occurred_from.0,
                occurred_to: occurred_to.0,
                ingested_from: ingested_from.0,
                ingested_to: ingested_to.0,
                contains: contains.0,
            },
            req.uri().query(),
            ROUTE_PARAMS,
        )?;
        let after = resume_position(cursor.0.as_deref(), last_event_id.0.as_deref())?;
        let format = Format::from_request(req);
        let follow = follow.0.unwrap_or(false);
        let permit = state.replay_stream_permit()?;
        let until_tx = if follow {
            None
        } else {
            let horizon = query::horizon(state.pool())
                .await
                .map_err(|e| ApiError::from_query(e, "starting a replay"))?;
            Some(horizon)
        };
        let producer = Producer {
            state: state.0.clone(),
            filter,
            until_tx,
            format,
            follow,
            after,
            sent: 0,
            _permit: permit,
        };
        // The first page is read before answering, so a filter the
        // database refuses, or a timeout, is a problem response.
        let first = producer
            .fetch()
            .await
            .map_err(|e| ApiError::from_query(e, "replaying events"))?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(CHANNEL_PAGES);
        let complete = Arc::new(AtomicBool::new(false));
        telemetry::started(&caller.name, format, follow);
        tokio::spawn(producer.run(first, tx, complete.clone()));
        Ok(ReplayStream {
            format,
            body: Body::from_bytes_stream(body_stream(rx, complete)),
        })
    }
}

/// The chunks of the response body. A stream that ends before its end
/// (a failed read, a stalled client, a bug) is cut off with an error, so
/// the client sees a broken response, never a complete-looking one.
fn body_stream(
    rx: mpsc::Receiver<Vec<u8>>,
    complete: Arc<AtomicBool>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::unfold(Some(rx), move |rx| {
        let complete = complete.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(chunk) => Some((Ok(chunk), Some(rx))),
                None if complete.load(Ordering::Acquire) => None,
                None => Some((
                    Err(std::io::Error::other(
                        "the replay stream stopped before its end; resume from the last cursor",
                    )),
                    None,
                )),
            }
        }
    })
}

/// `decrypt` and `purpose` get their own 400: decryption is not offered here.
fn refuse_decrypt(raw_query: Option<&str>) -> Result<(), ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw_query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query string does not parse: {e}")))?;
    if pairs.iter().any(|(k, _)| k == "decrypt" || k == "purpose") {
        return Err(ApiError::bad_request(
            "replay does not decrypt protected fields (it streams them redacted); \
             to read decrypted events, page through GET /v1/events with decrypt=true and a purpose (auditor role)",
        ));
    }
    Ok(())
}

/// Where to start: after `Last-Event-ID` if given (an SSE client sends the
/// id of the last event it received when it reconnects), else after `cursor`.
fn resume_position(
    cursor: Option<&str>,
    last_event_id: Option<&str>,
) -> Result<Option<Position>, ApiError> {
    let Some(id) = last_event_id.map(str::trim).filter(|s| !s.is_empty()) else {
        return filters::event_cursor(cursor);
    };
    Position::from_cursor(id).map(Some).map_err(|_| {
        ApiError::bad_request(
            "header `Last-Event-ID` is not an event id this stream sent; send back the `id` of the last event received unchanged",
        )
    })
}

/// One encoded page: its bytes, its size, and where it ended.
struct Encoded {
    bytes: Vec<u8>,
    events: usize,
    last: Option<Position>,
}

/// Feeds one stream's channel, page after page, and holds its permit.
struct Producer {
    state: Arc<ApiState>,
    filter: EventFilter,
    until_tx: Option<u64>,
    format: Format,
    follow: bool,
    after: Option<Position>,
    sent: u64,
    _permit: OwnedSemaphorePermit,
}

type Chunks = mpsc::Sender<Vec<u8>>;

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every event up to the horizon was sent (no `follow`).
    Complete,
    /// The client went away.
    Disconnected,
    /// The client read nothing for [`STALL_TIMEOUT`].
    Stalled,
    /// Reading failed; the client resumes from its last cursor.
    Failed,
}

/// Hands a chunk to the client, waiting at most [`STALL_TIMEOUT`] for room.
async fn send(tx: &Chunks, chunk: Vec<u8>) -> Result<(), End> {
    send_within(tx, chunk, STALL_TIMEOUT).await
}

async fn send_within(tx: &Chunks, chunk: Vec<u8>, stall: Duration) -> Result<(), End> {
    match tokio::time::timeout(stall, tx.send(chunk)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Disconnected),
        Err(_) => Err(End::Stalled),
    }
}

impl Producer {
    /// The next page after `self.after`, encoded.
    async fn fetch(&self) -> Result<Encoded, QueryError> {
        let rows = query::page_query(
            EVENT_COLUMNS,
            PageQuery {
                filter: &self.filter,
                after: self.after,
                limit: REPLAY_PAGE,
                until_tx: self.until_tx,
            },
        )
        .build()
        .fetch_all(self.state.pool())
        .await?;
        let format = self.format;
        // Encoding a page is a few milliseconds of CPU: off the async workers.
        tokio::task::spawn_blocking(move || encode_page(&rows, format))
            .await
            .map_err(|e| QueryError::Fatal(format!("encoding a replay page panicked: {e}")))?
    }

    /// Streams until the end, and marks a complete stream as such (the
    /// permit goes when `self` does).
    async fn run(mut self, first: Encoded, tx: Chunks, complete: Arc<AtomicBool>) {
        let end = match self.pump(first, &tx).await {
            Ok(()) => End::Complete,
            Err(end) => end,
        };
        if end == End::Complete {
            complete.store(true, Ordering::Release);
        }
        telemetry::ended(self.sent, end);
    }

    async fn pump(&mut self, first: Encoded, tx: &Chunks) -> Result<(), End> {
        let mut page = first;
        let mut last_write = Instant::now();
        loop {
            let full = page.events as i64 >= REPLAY_PAGE;
            if page.events > 0 {
                send(tx, page.bytes).await?;
                self.after = page.last;
                self.sent += page.events as u64;
                telemetry::sent(page.events);
                last_write = Instant::now();
            }
            // A full page: more may follow at once. Otherwise caught up.
            if !full {
                if !self.follow {
                    if self.format == Format::Sse {
                        send(tx, SSE_END.to_vec()).await?;
                    }
                    return Ok(());
                }
                tokio::select! {
                    _ = tx.closed() => return Err(End::Disconnected),
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                if last_write.elapsed() >= KEEP_ALIVE {
                    send(tx, self.keep_alive().to_vec()).await?;
                    last_write = Instant::now();
                }
            }
            page = match self.fetch().await {
                Ok(page) => page,
                Err(error) => {
                    self.fail(tx, error).await;
                    return Err(End::Failed);
                }
            };
        }
    }

    fn keep_alive(&self) -> &'static [u8] {
        match self.format {
            Format::Ndjson => b"\n",
            Format::Sse => b": keep-alive\n\n",
        }
    }

    /// After a failed read: SSE clients get an `error` event; both formats
    /// are then cut off (see [`body_stream`]).
    async fn fail(&self, tx: &Chunks, error: QueryError) {
        let problem = ApiError::from_query(error, "replaying events");
        let problem = problem.problem();
        telemetry::failed(&problem.detail);
        if self.format == Format::Sse {
            let _ = send(tx, sse_error(problem)).await;
        }
    }
}

const SSE_END: &[u8] = b"event: end\ndata: {}\n\n";

fn sse_error(problem: &Problem) -> Vec<u8> {
    let body = serde_json::json!({
        "type": problem.problem_type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    });
    format!("event: error\ndata: {body}\n\n").into_bytes()
}

fn encode_page(rows: &[PgRow], format: Format) -> Result<Encoded, QueryError> {
    let mut bytes = Vec::with_capacity(rows.len() * 1024);
    let mut last = None;
    for row in rows {
        last = Some(write_event(row, format, &mut bytes)?);
    }
    Ok(Encoded {
        bytes,
        events: rows.len(),
        last,
    })
}

/// Writes one event as an NDJSON line or a server-sent event; the JSON is
/// the `ReplayEvent` schema (the same fields, with the same spellings, as
/// `EventView` plus `cursor`).
fn write_event(row: &PgRow, format: Format, out: &mut Vec<u8>) -> Result<Position, QueryError> {
    let position = row_position(row)?;
    let cursor = position.to_cursor();
    if format == Format::Sse {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(cursor.as_bytes());
        out.extend_from_slice(b"\nevent: event\ndata: ");
    }
    let mut o = JsonObject::open(out);
    write_event_fields(row, &mut o)?;
    o.key("cursor").str(&cursor);
    o.close();
    // One line per event: nothing above writes a line break (strings are
    // escaped, and PostgreSQL prints jsonb on one line).
    match format {
        Format::Ndjson => out.push(b'\n'),
        Format::Sse => out.extend_from_slice(b"\n\n"),
    }
    Ok(position)
}

/// The replay stream's log lines and metrics, one function each.
mod telemetry {
    use super::{End, Format};

    pub fn started(caller: &str, format: Format, follow: bool) {
        metrics::counter!("audit_api_replay_streams_total").increment(1);
        tracing::info!(caller, ?format, follow, "replay stream started");
    }

    pub fn sent(events: usize) {
        metrics::counter!("audit_api_replay_events_total").increment(events as u64);
    }

    pub fn ended(events: u64, end: End) {
        tracing::info!(events, ?end, "replay stream ended");
    }

    pub fn failed(detail: &str) {
        tracing::warn!(
            detail,
            "replay stream failed; the client resumes from its last cursor"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unfinished_stream_is_cut_off_not_ended() {
        use futures::StreamExt as _;
        for finished in [true, false] {
            let (tx, rx) = mpsc::channel(2);
            let complete = Arc::new(AtomicBool::new(finished));
            tx.send(b"a".to_vec()).await.unwrap();
            drop(tx);
            let items: Vec<_> = body_stream(rx, complete).collect().await;
            assert_eq!(items.len(), if finished { 1 } else { 2 });
            assert_eq!(items[0].as_ref().unwrap(), b"a");
            if !finished {
                assert!(items[1].is_err());
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_is_given_up() {
        let stall = Duration::from_millis(30);
        let (tx, mut rx) = mpsc::channel(1);
        send_within(&tx, vec![1], stall).await.unwrap();
        let started = Instant::now();
        assert_eq!(send_within(&tx, vec![2], stall).await, Err(End::Stalled));
        assert!(started.elapsed() >= stall);
        drop(rx.recv().await);
        drop(rx);
        assert_eq!(send(&tx, vec![3]).await, Err(End::Disconnected));
    }

    #[test]
    fn sse_resume_wins_over_the_cursor() {
        let a = Position { tx: 5, seq: 1 };
        let b = Position { tx: 9, seq: 2 };
        let got = resume_position(Some(&a.to_cursor()), Some(&b.to_cursor())).unwrap();
        assert_eq!(got, Some(b));
        let got = resume_position(Some(&a.to_cursor()), Some(" ")).unwrap();
        assert_eq!(got, Some(a));
        assert_eq!(resume_position(None, None).unwrap(), None);
        let bad = resume_position(None, Some("nope")).unwrap_err();
        assert!(bad.problem().detail.contains("Last-Event-ID"));
        assert!(refuse_decrypt(Some("decrypt=true&purpose=x")).is_err());
        assert!(refuse_decrypt(Some("follow=true")).is_ok());
    }
}
