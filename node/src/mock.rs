//! librdkafka's mock cluster: a Kafka-protocol cluster on loopback for `dev`,
//! `kafka-mock` and the tests (no broker can be installed on our machines).
//!
//! rdkafka's `MockCluster` hides the native handle, and we need two knobs it
//! does not expose (no initial rebalance delay, a short session timeout for
//! the KIP-848 protocol, so a killed node's partitions move in seconds), so
//! this wraps the C API directly. The cluster is `!Send`: it lives on its own
//! thread and is driven through a guard.

use std::ffi::{CStr, CString};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context as _};
use rdkafka::bindings as rd;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

/// A topic to create: `name:partitions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
}

impl std::str::FromStr for TopicSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, partitions) = match s.split_once(':') {
            Some((name, p)) => (
                name,
                p.parse::<i32>()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| format!("invalid partition count {p:?} in {s:?}: expected NAME:PARTITIONS with PARTITIONS >= 1"))?,
            ),
            None => (s, 1),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(format!(
                "invalid topic name {name:?}: use letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            partitions,
        })
    }
}

struct MockCluster {
    cluster: *mut rd::rd_kafka_mock_cluster_t,
    // Owns the rd_kafka_t handle the cluster runs on; dropped after it.
    _client: BaseProducer,
}

impl MockCluster {
    fn new(brokers: i32) -> anyhow::Result<Self> {
        let client: BaseProducer = ClientConfig::new()
            .create()
            .context("creating the mock cluster's client")?;
        // SAFETY: the handle is valid while `client` lives, and the cluster is
        // destroyed (Drop) before the client is.
        let cluster =
            unsafe { rd::rd_kafka_mock_cluster_new(client.client().native_ptr(), brokers) };
        if cluster.is_null() {
            bail!("librdkafka could not create a mock cluster with {brokers} brokers");
        }
        let mock = Self {
            cluster,
            _client: client,
        };
        // SAFETY: cluster is a valid handle.
        unsafe {
            rd::rd_kafka_mock_group_initial_rebalance_delay_ms(mock.cluster, 0);
            rd::rd_kafka_mock_set_group_consumer_session_timeout_ms(mock.cluster, 6000);
            rd::rd_kafka_mock_set_group_consumer_heartbeat_interval_ms(mock.cluster, 500);
        }
        Ok(mock)
    }

    fn bootstrap(&self) -> String {
        // SAFETY: returns a NUL-terminated string owned by the cluster.
        unsafe { CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(self.cluster)) }
            .to_string_lossy()
            .into_owned()
    }

    fn create_topic(&self, topic: &TopicSpec) -> anyhow::Result<()> {
        let name = CString::new(topic.name.as_str())?;
        // SAFETY: valid cluster and NUL-terminated name.
        let err = unsafe {
            rd::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), topic.partitions, 1)
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            bail!(
                "creating topic {} on the mock cluster failed: {err:?}",
                topic.name
            );
        }
        Ok(())
    }
}

impl Drop for MockCluster {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new, destroyed once.
        unsafe { rd::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// A fault to inject into a running mock cluster (`kafka-mock
/// --control-addr`, see mock_control.rs). Error codes are Kafka protocol
/// codes, resolved by [`resolve_error`].
#[derive(Debug, Clone)]
pub enum ControlOp {
    /// The broker closes its connections and refuses new ones.
    BrokerDown(i32),
    BrokerUp(i32),
    /// Delays every response of the broker.
    BrokerRtt {
        broker: i32,
        rtt_ms: i32,
    },
    /// The next requests of `api_key` to this broker fail with these errors,
    /// one error per request, each response delayed by its rtt.
    PushBrokerErrors {
        broker: i32,
        api_key: i16,
        errors: Vec<(rd::rd_kafka_resp_err_t, i32)>,
    },
    /// Errors of `api_key` still queued on the broker.
    PendingBrokerErrors {
        broker: i32,
        api_key: i16,
    },
    /// The next requests of `api_key` to any broker fail with these errors.
    PushErrors {
        api_key: i16,
        errors: Vec<rd::rd_kafka_resp_err_t>,
    },
    /// Forgets the cluster-wide errors of `api_key` not yet returned.
    ClearErrors {
        api_key: i16,
    },
}

type ControlReply = std::sync::mpsc::Sender<Result<usize, String>>;

enum MockMsg {
    Control(ControlOp, ControlReply),
    Stop,
}

impl MockCluster {
    /// Applies one fault; `Ok(n)` is the pending error count for
    /// `PendingBrokerErrors` and `PushBrokerErrors`, 0 otherwise.
    fn apply(&self, op: &ControlOp) -> Result<usize, String> {
        let check = |err: rd::rd_kafka_resp_err_t, what: &str| {
            if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                Ok(0)
            } else {
                Err(format!("{what}: {}", error_name(err)))
            }
        };
        // SAFETY (every block below): `self.cluster` is a valid handle, and
        // the mock's setters take the cluster lock themselves.
        match op {
            ControlOp::BrokerDown(id) => check(
                unsafe { rd::rd_kafka_mock_broker_set_down(self.cluster, *id) },
                "broker down",
            ),
            ControlOp::BrokerUp(id) => check(
                unsafe { rd::rd_kafka_mock_broker_set_up(self.cluster, *id) },
                "broker up",
            ),
            ControlOp::BrokerRtt { broker, rtt_ms } => check(
                unsafe { rd::rd_kafka_mock_broker_set_rtt(self.cluster, *broker, *rtt_ms) },
                "broker rtt",
            ),
            ControlOp::PushBrokerErrors {
                broker,
                api_key,
                errors,
            } => {
                for (err, rtt_ms) in errors {
                    // Variadic pairs (rd_kafka_resp_err_t, int), one at a time.
                    let result = unsafe {
                        rd::rd_kafka_mock_broker_push_request_error_rtts(
                            self.cluster,
                            *broker,
                            *api_key,
                            1,
                            *err as std::ffi::c_int,
                            *rtt_ms as std::ffi::c_int,
                        )
                    };
                    check(result, "push broker request errors")?;
                }
                self.apply(&ControlOp::PendingBrokerErrors {
                    broker: *broker,
                    api_key: *api_key,
                })
            }
            ControlOp::PendingBrokerErrors { broker, api_key } => {
                let mut count = 0usize;
                let err = unsafe {
                    rd::rd_kafka_mock_broker_error_stack_cnt(
                        self.cluster,
                        *broker,
                        *api_key,
                        &mut count,
                    )
                };
                match err {
                    rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(count),
                    // No stack yet for this ApiKey: nothing pending.
                    rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__INVALID_ARG => Ok(0),
                    other => Err(format!("pending broker errors: {}", error_name(other))),
                }
            }
            ControlOp::PushErrors { api_key, errors } => {
                unsafe {
                    rd::rd_kafka_mock_push_request_errors_array(
                        self.cluster,
                        *api_key,
                        errors.len(),
                        errors.as_ptr(),
                    )
                };
                Ok(0)
            }
            ControlOp::ClearErrors { api_key } => {
                unsafe { rd::rd_kafka_mock_clear_request_errors(self.cluster, *api_key) };
                Ok(0)
            }
        }
    }
}

/// A handle to inject faults into a running cluster, from any thread.
#[derive(Clone)]
pub struct MockControl {
    tx: mpsc::Sender<MockMsg>,
    pub brokers: i32,
    pub bootstrap: String,
}

impl MockControl {
    /// Runs `op` on the cluster's thread and waits for its outcome.
    pub fn apply(&self, op: ControlOp) -> Result<usize, String> {
        let (reply, outcome) = mpsc::channel();
        self.tx
            .send(MockMsg::Control(op, reply))
            .map_err(|_| "the mock cluster has stopped".to_string())?;
        outcome
            .recv()
            .map_err(|_| "the mock cluster has stopped".to_string())?
    }
}

/// A running mock cluster. Dropping it stops the cluster: drop it last,
/// after every client using it (see ../shared/notes/kafka-mock.md).
pub struct MockGuard {
    bootstrap: String,
    brokers: i32,
    tx: mpsc::Sender<MockMsg>,
    thread: Option<JoinHandle<()>>,
}

impl MockGuard {
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A handle for fault injection (`kafka-mock --control-addr`).
    pub fn control(&self) -> MockControl {
        MockControl {
            tx: self.tx.clone(),
            brokers: self.brokers,
            bootstrap: self.bootstrap.clone(),
        }
    }
}

impl Drop for MockGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(MockMsg::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts a mock cluster on its own thread with the given topics.
pub fn start(brokers: i32, topics: &[TopicSpec]) -> anyhow::Result<MockGuard> {
    if !(1..=16).contains(&brokers) {
        bail!("--brokers must be between 1 and 16, got {brokers}");
    }
    let topics = topics.to_vec();
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<String>>();
    let (tx, rx) = mpsc::channel::<MockMsg>();
    let thread = std::thread::Builder::new()
        .name("kafka-mock".into())
        .spawn(move || {
            let cluster = match MockCluster::new(brokers) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for topic in &topics {
                if let Err(e) = cluster.create_topic(topic) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(cluster.bootstrap()));
            // Runs until the guard is dropped (Stop, or every sender gone).
            while let Ok(MockMsg::Control(op, reply)) = rx.recv() {
                let outcome = cluster.apply(&op);
                match &outcome {
                    Ok(n) => tracing::info!(op = ?op, result = n, "mock cluster fault applied"),
                    Err(error) => {
                        tracing::warn!(op = ?op, error = %error, "mock cluster fault refused")
                    }
                }
                let _ = reply.send(outcome);
            }
            drop(cluster);
        })
        .context("spawning the mock cluster thread")?;
    let bootstrap = ready_rx
        .recv()
        .map_err(|_| anyhow!("the mock cluster thread exited before it was ready"))??;
    Ok(MockGuard {
        bootstrap,
        brokers,
        tx,
        thread: Some(thread),
    })
}

/// librdkafka's name of an error code, e.g. `NOT_LEADER_FOR_PARTITION`.
pub fn error_name(err: rd::rd_kafka_resp_err_t) -> String {
    // SAFETY: returns a static NUL-terminated string for any code.
    unsafe { CStr::from_ptr(rd::rd_kafka_err2name(err)) }
        .to_string_lossy()
        .into_owned()
}

/// An error code by librdkafka's name (`NOT_LEADER_FOR_PARTITION`, with or
/// without the `RD_KAFKA_RESP_ERR_` prefix, any case) or by number (`6`).
/// `_TRANSPORT` (-195) makes the mock close the connection instead.
pub fn resolve_error(spec: &str) -> Result<rd::rd_kafka_resp_err_t, String> {
    let mut descs: *const rd::rd_kafka_err_desc = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: librdkafka hands out a pointer to its static table.
    unsafe { rd::rd_kafka_get_err_descs(&mut descs, &mut count) };
    if descs.is_null() {
        return Err("librdkafka has no error table".into());
    }
    // SAFETY: `count` entries at `descs`, static.
    let table = unsafe { std::slice::from_raw_parts(descs, count) };
    let spec = spec.trim();
    let number = spec.parse::<i32>().ok();
    let upper = spec.to_ascii_uppercase();
    let wanted = upper.trim_start_matches("RD_KAFKA_RESP_ERR_");
    table
        .iter()
        .filter(|d| !d.name.is_null())
        .find(|d| match number {
            Some(n) => d.code as i32 == n,
            // SAFETY: non-null names are static C strings.
            None => unsafe { CStr::from_ptr(d.name) }.to_string_lossy() == wanted,
        })
        .map(|d| d.code)
        .ok_or_else(|| format!("unknown Kafka error {spec:?}: use a librdkafka name such as NOT_LEADER_FOR_PARTITION or a number"))
}

/// Kafka API keys by name (the requests worth failing in tests), or a number.
pub fn resolve_api_key(spec: &str) -> Result<i16, String> {
    const KEYS: &[(&str, i16)] = &[
        ("Produce", 0),
        ("Fetch", 1),
        ("ListOffsets", 2),
        ("Metadata", 3),
        ("OffsetCommit", 8),
        ("OffsetFetch", 9),
        ("FindCoordinator", 10),
        ("JoinGroup", 11),
        ("Heartbeat", 12),
        ("LeaveGroup", 13),
        ("SyncGroup", 14),
        ("ApiVersions", 18),
        ("InitProducerId", 22),
        ("ConsumerGroupHeartbeat", 68),
    ];
    if let Ok(n) = spec.trim().parse::<i16>() {
        return Ok(n);
    }
    KEYS.iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(spec.trim()))
        .map(|(_, key)| *key)
        .ok_or_else(|| {
            let names: Vec<&str> = KEYS.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown Kafka API {spec:?}: use a number or one of {}",
                names.join(", ")
            )
        })
}

/// Writes `content` to `path` atomically (write a temp file, then rename),
/// so a reader polling for the file never sees it half-written.
pub fn write_atomically(path: &std::path::Path, content: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_topic_specs() {
        assert_eq!(
            "orders:16".parse(),
            Ok(TopicSpec {
                name: "orders".into(),
                partitions: 16
            })
        );
        assert_eq!(
            "orders".parse(),
            Ok(TopicSpec {
                name: "orders".into(),
                partitions: 1
            })
        );
        assert!("orders:0".parse::<TopicSpec>().is_err());
        assert!("orders:x".parse::<TopicSpec>().is_err());
        assert!("bad topic:3".parse::<TopicSpec>().is_err());
    }

    #[test]
    fn resolves_errors_and_api_keys() {
        assert_eq!(resolve_error("NOT_LEADER_FOR_PARTITION").unwrap() as i32, 6);
        assert_eq!(
            resolve_error("rd_kafka_resp_err_not_leader_for_partition").unwrap() as i32,
            6
        );
        assert_eq!(resolve_error("6").unwrap() as i32, 6);
        assert_eq!(resolve_error("_TRANSPORT").unwrap() as i32, -195);
        assert!(resolve_error("NO_SUCH_ERROR").is_err());
        assert_eq!(resolve_api_key("fetch"), Ok(1));
        assert_eq!(resolve_api_key("68"), Ok(68));
        assert!(resolve_api_key("Nope").is_err());
    }

    #[test]
    fn injects_faults() {
        let guard = start(2, &["t:2".parse().unwrap()]).unwrap();
        let control = guard.control();
        let fetch = resolve_api_key("Fetch").unwrap();
        let err = resolve_error("NOT_LEADER_FOR_PARTITION").unwrap();
        assert_eq!(
            control.apply(ControlOp::PendingBrokerErrors {
                broker: 1,
                api_key: fetch
            }),
            Ok(0)
        );
        assert_eq!(
            control.apply(ControlOp::PushBrokerErrors {
                broker: 1,
                api_key: fetch,
                errors: vec![(err, 0), (err, 10)],
            }),
            Ok(2)
        );
        assert_eq!(control.apply(ControlOp::BrokerDown(2)), Ok(0));
        assert_eq!(control.apply(ControlOp::BrokerUp(2)), Ok(0));
        assert_eq!(
            control.apply(ControlOp::BrokerRtt {
                broker: 1,
                rtt_ms: 5
            }),
            Ok(0)
        );
        assert!(
            control.apply(ControlOp::BrokerDown(9)).is_err(),
            "unknown broker"
        );
        drop(guard);
        assert!(
            control.apply(ControlOp::BrokerUp(1)).is_err(),
            "cluster stopped"
        );
    }

    #[test]
    fn starts_and_stops() {
        let guard = start(1, &["t:2".parse().unwrap()]).unwrap();
        assert!(guard.bootstrap().starts_with("127.0.0.1:"));
        drop(guard);
    }
}
