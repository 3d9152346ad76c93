//! What crosses the simulated network: length-prefixed JSON frames over
//! turmoil TCP, and every call bounded by a timeout, because a partitioned
//! or held link in turmoil drops or parks bytes without any error.

use std::io;
use std::time::Duration;

use audit_ledger::{Header, OffsetKey, RawRecord};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

/// Largest frame accepted: a batch of a few hundred small records.
const MAX_FRAME: usize = 16 << 20;

pub const BROKER_PORT: u16 = 9092;
pub const STORE_PORT: u16 = 5432;

/// A Kafka record on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp_ms: Option<i64>,
}

impl From<&RawRecord> for WireRecord {
    fn from(r: &RawRecord) -> Self {
        Self {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r
                .headers
                .iter()
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect(),
            timestamp_ms: r.timestamp_ms,
        }
    }
}

impl From<WireRecord> for RawRecord {
    fn from(r: WireRecord) -> Self {
        Self {
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            key: r.key,
            value: r.value,
            headers: r
                .headers
                .into_iter()
                .map(|(key, value)| Header { key, value })
                .collect(),
            timestamp_ms: r.timestamp_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireKey {
    pub group_id: String,
    pub topic: String,
    pub partition: i32,
}

impl From<&OffsetKey> for WireKey {
    fn from(k: &OffsetKey) -> Self {
        Self {
            group_id: k.group_id.clone(),
            topic: k.topic.clone(),
            partition: k.partition,
        }
    }
}

impl From<WireKey> for OffsetKey {
    fn from(k: WireKey) -> Self {
        Self {
            group_id: k.group_id,
            topic: k.topic,
            partition: k.partition,
        }
    }
}

/// Requests to the broker.
#[derive(Debug, Serialize, Deserialize)]
pub enum BrokerRequest {
    /// Records from `from` on: wait up to `wait_ms` for a first one, then
    /// `linger_ms` for more; at most `max`.
    Fetch {
        partition: i32,
        from: i64,
        max: usize,
        wait_ms: u64,
        linger_ms: u64,
    },
    /// The high watermark.
    End { partition: i32 },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum BrokerResponse {
    Records(Vec<WireRecord>),
    End(Option<i64>),
    Error(String),
}

/// Requests to the store: one connection is one session; `Begin`, `Rows`
/// and `Commit` make one transaction, so a crash between them loses it.
#[derive(Debug, Serialize, Deserialize)]
pub enum StoreRequest {
    StoredOffset(WireKey),
    Begin {
        key: WireKey,
        expected: Option<i64>,
        writer: String,
    },
    Rows(Vec<WireRecord>),
    Commit,
    /// Row counts, for the conformance suite.
    Counts,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum StoreResponse {
    Offset(Option<i64>),
    Ok,
    Committed {
        events: u64,
        dead_letters: u64,
        duplicates: u64,
    },
    Fenced(Option<i64>),
    Counts {
        events: u64,
        dead_letters: u64,
        duplicates: u64,
    },
    Error(String),
}

pub async fn send<T: Serialize>(stream: &mut TcpStream, message: &T) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await
}

/// The next frame; `None` when the peer closed the connection.
pub async fn recv<T: DeserializeOwned>(stream: &mut TcpStream) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(io::Error::other)
}

/// One request and its response within `timeout`.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    stream: &mut TcpStream,
    request: &Q,
    timeout: Duration,
) -> io::Result<R> {
    let exchange = async {
        send(stream, request).await?;
        recv(stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionReset, "closed by peer"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response in time"))?
}

pub async fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {host}")))?
}
