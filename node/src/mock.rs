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

/// A running mock cluster. Dropping it stops the cluster: drop it last,
/// after every client using it (see ../shared/notes/kafka-mock.md).
pub struct MockGuard {
    bootstrap: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockGuard {
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for MockGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
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
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
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
            // Runs until the guard is dropped (the sender closes).
            let _ = stop_rx.recv();
            drop(cluster);
        })
        .context("spawning the mock cluster thread")?;
    let bootstrap = ready_rx
        .recv()
        .map_err(|_| anyhow!("the mock cluster thread exited before it was ready"))??;
    Ok(MockGuard {
        bootstrap,
        stop: Some(stop_tx),
        thread: Some(thread),
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
    fn starts_and_stops() {
        let guard = start(1, &["t:2".parse().unwrap()]).unwrap();
        assert!(guard.bootstrap().starts_with("127.0.0.1:"));
        drop(guard);
    }
}
