//! Read-ahead of one Kafka partition: a task copies records out of the
//! partition's librdkafka queue as soon as they arrive, into a buffer
//! bounded by bytes, and pauses the partition at the broker while the buffer
//! is full.
//!
//! Why not leave the records in librdkafka's queue until the partition actor
//! wants them (as before, PERFORMANCE.md session 11):
//! - a fetch response stays in memory until its last record is consumed, so
//!   records left waiting in a few slow queues pinned whole responses of
//!   every partition: about 100 MB of a 1M-record drain over 256 partitions,
//!   three times the prefetch budget;
//! - a partition whose librdkafka queue was full when the fetcher looked
//!   was not fetched again for `fetch.queue.backoff.ms` (1 s), even once
//!   drained: the idle second at the end of short runs.
//!
//! Here the librdkafka queue stays nearly empty, and the bound is enforced
//! with pause/resume, which librdkafka implements exactly: pausing drops
//! what it fetched past the last record handed out and, on resume, fetches
//! again from there.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use audit_ledger::RawRecord;
use futures::{FutureExt, StreamExt};
use tokio::sync::{oneshot, Notify};

use crate::source::SourceError;

/// Records taken from the librdkafka queue in one go, before the buffer's
/// lock is taken to add them.
const READ_CHUNK: usize = 256;

/// How long the reader waits for a wake-up before looking at the queue
/// itself. rdkafka wakes a partition queue's reader through a callback on
/// librdkafka's queue, and dropping any handle of that queue turns the
/// callback off: when a partition is revoked and assigned again quickly,
/// the old source's handle can be dropped after the new one was made, and
/// the new reader then waited forever with records in its queue
/// (`broker_down_and_up`, in 2 of 5 runs). See `fill`.
const WAKEUP_CHECK: Duration = Duration::from_secs(1);

/// The partition at the broker: seeking (blocking), pausing, resuming.
pub trait FetchControl: Send + Sync + 'static {
    fn seek(&self, offset: Option<i64>) -> Result<(), SourceError>;
    /// Pauses (`true`) or resumes (`false`) fetching.
    fn set_paused(&self, paused: bool) -> Result<(), String>;
}

type SeekRequest = (Option<i64>, oneshot::Sender<Result<(), SourceError>>);

type ControlCall = Box<dyn FnOnce() + Send>;

/// Pause and resume calls waiting for the control thread, at most.
const CONTROL_QUEUE: usize = 4096;

/// The node's one thread for pause and resume calls, in the order sent.
fn control_thread() -> &'static std::sync::mpsc::SyncSender<ControlCall> {
    static SENDER: std::sync::OnceLock<std::sync::mpsc::SyncSender<ControlCall>> =
        std::sync::OnceLock::new();
    SENDER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<ControlCall>(CONTROL_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("kafka-fetch-control".into())
            .spawn(move || {
                for call in rx {
                    call();
                }
            });
        if let Err(error) = spawned {
            // Every send then fails, and only librdkafka's own bound holds.
            tracing::error!(error = %error, "read-ahead: cannot start the fetch control thread");
        }
        tx
    })
}

/// What a reader task and the partition's reads share.
pub struct ReadAhead {
    state: Mutex<State>,
    /// Records, an error or the end arrived: wakes a read.
    arrived: Notify,
    /// A seek was asked for, or the buffer fell to half its bound: wakes
    /// the reader.
    wake: Notify,
    limit_bytes: usize,
    control: Arc<dyn FetchControl>,
}

#[derive(Default)]
struct State {
    records: VecDeque<RawRecord>,
    bytes: usize,
    error: Option<String>,
    ended: bool,
    /// Paused because the buffer is full.
    full: bool,
    /// Paused on request (the store is down).
    held: bool,
    /// A seek for the reader to do: only the reader takes records out of
    /// librdkafka, so none can be taken while the position moves.
    seek: Option<SeekRequest>,
    /// The offset after the last record buffered since the last seek.
    next_offset: Option<i64>,
    /// Whether the reader has the partition paused at the broker (it alone
    /// pauses and resumes); kept here so that it survives a `fill` that
    /// returned to re-arm its queue.
    paused_at_broker: bool,
}

/// What a `take` found.
pub enum Taken {
    /// Records moved: this many bytes of them.
    Records(usize),
    Error(String),
    Ended,
    Empty,
}

impl ReadAhead {
    pub fn new(limit_bytes: usize, control: Arc<dyn FetchControl>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
            wake: Notify::new(),
            limit_bytes: limit_bytes.max(1),
            control,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies records out of `stream` and does the seeks asked for; run as
    /// a task of its own, aborted when the partition's source is dropped.
    ///
    /// Returns only when it found a record waiting in the queue after
    /// `WAKEUP_CHECK` without having been woken for it: the queue's wake-up
    /// was lost. The caller then makes a new handle of the queue (which
    /// turns the wake-up on again) and calls `fill` again; what was read is
    /// buffered and nothing is lost.
    pub async fn fill<S, M, E>(self: Arc<Self>, mut stream: S, copy: impl Fn(&M) -> RawRecord)
    where
        S: futures::Stream<Item = Result<M, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut chunk = Vec::with_capacity(READ_CHUNK);
        let mut ended = false;
        // Only this task pauses, resumes and seeks, in order, and off the
        // async workers: librdkafka's calls wait for its own threads. Pauses
        // and resumes go to one control thread (in order, and without a
        // thread per call: each thread of the blocking pool keeps an
        // allocator heap), seeks to the blocking pool.
        loop {
            let request = self.lock().seek.take();
            if let Some((offset, reply)) = request {
                self.clear();
                let control = self.control.clone();
                let result = tokio::task::spawn_blocking(move || control.seek(offset))
                    .await
                    .unwrap_or_else(|e| Err(SourceError::Fatal(format!("seek task failed: {e}"))));
                let _ = reply.send(result);
                ended = false;
                continue;
            }
            let room = self.has_room();
            self.apply_pause();
            if ended || !room {
                self.wake.notified().await;
                continue;
            }
            let mut error = None;
            let mut wakeup_lost = false;
            let woken = tokio::select! {
                biased;
                () = self.wake.notified() => continue,
                // Before the stream: polled after the timer, the stream would
                // find the record itself and the lost wake-up go unnoticed.
                () = tokio::time::sleep(WAKEUP_CHECK) => None,
                item = stream.next() => Some(item),
            };
            let item = match woken {
                Some(item) => item,
                // Woken by nothing for a while: look at the queue itself.
                None => match stream.next().now_or_never() {
                    Some(item) => {
                        wakeup_lost = true;
                        item
                    }
                    None => continue,
                },
            };
            match item {
                None => ended = true,
                Some(Err(e)) => error = Some(e.to_string()),
                Some(Ok(message)) => {
                    chunk.push(copy(&message));
                    drop(message);
                    // What else is already there, without waiting.
                    while chunk.len() < READ_CHUNK {
                        match stream.next().now_or_never() {
                            Some(Some(Ok(message))) => chunk.push(copy(&message)),
                            Some(Some(Err(e))) => {
                                error = Some(e.to_string());
                                break;
                            }
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            let repeated = self.add(&mut chunk, error, ended);
            if repeated > 0 {
                tracing::debug!(
                    repeated,
                    "read-ahead: dropped records fetched again after a resume"
                );
            }
            if wakeup_lost {
                tracing::info!(
                    "read-ahead: records waited without a wake-up; re-arming the partition queue"
                );
                return;
            }
        }
    }

    /// Pauses or resumes the partition if the buffer or a hold asks for it,
    /// on the control thread. When its queue is full the call is left for
    /// the next wake-up; meanwhile librdkafka's own bound
    /// (queued.max.messages.kbytes) still holds.
    fn apply_pause(&self) {
        let wanted = {
            let state = self.lock();
            if (state.full || state.held) == state.paused_at_broker {
                return;
            }
            !state.paused_at_broker
        };
        let control = self.control.clone();
        let call: ControlCall = Box::new(move || {
            if let Err(error) = control.set_paused(wanted) {
                tracing::warn!(error = %error, pause = wanted, "read-ahead: pause or resume refused");
            }
        });
        if control_thread().try_send(call).is_ok() {
            self.lock().paused_at_broker = wanted;
        }
    }

    /// Whether the reader may read on: the buffer is not full, or has
    /// fallen to half its bound since it was.
    fn has_room(&self) -> bool {
        let mut state = self.lock();
        if !state.full {
            return true;
        }
        if state.bytes > self.limit_bytes / 2 {
            return false;
        }
        state.full = false;
        true
    }

    /// Buffers `chunk`, except records at offsets already buffered since the
    /// last seek. After a pause and a resume librdkafka fetches again from
    /// the position it saved when it handled the pause, which can be behind
    /// what was already polled: records come twice (seen in one of eleven
    /// `node-cpu.sh` runs, 15,399 of them). A repeat (same partition, same offset) is
    /// the same record, so it is dropped here; left in, the partition actor
    /// saw its batch go back, sought, and dropped the whole buffer. Returns
    /// how many were dropped.
    fn add(&self, chunk: &mut Vec<RawRecord>, error: Option<String>, ended: bool) -> usize {
        let mut state = self.lock();
        let mut repeated = 0;
        for record in chunk.drain(..) {
            if state.next_offset.is_some_and(|next| record.offset < next) {
                repeated += 1;
                continue;
            }
            state.next_offset = Some(record.offset + 1);
            state.bytes += footprint(&record);
            state.records.push_back(record);
        }
        if error.is_some() {
            state.error = error;
        }
        state.ended |= ended;
        if state.bytes >= self.limit_bytes {
            state.full = true;
        }
        drop(state);
        self.arrived.notify_one();
        repeated
    }

    /// Moves up to `max` buffered records, within `budget` bytes (see
    /// `take_records`), into `into`; an error or the end once the records
    /// before it were taken.
    pub fn take(&self, max: usize, budget: usize, into: &mut Vec<RawRecord>) -> Taken {
        let mut state = self.lock();
        if state.records.is_empty() {
            if let Some(error) = state.error.take() {
                return Taken::Error(error);
            }
            return if state.ended {
                Taken::Ended
            } else {
                Taken::Empty
            };
        }
        drop(state);
        Taken::Records(self.take_records(max, budget, into).1)
    }

    /// Moves up to `max` buffered records, and while `budget` (bytes, as
    /// [`footprint`] counts them) lasts, into `into`, leaving an error or
    /// the end for the next `take`. At least one record is moved if any is
    /// buffered and `max` allows. Returns the records and bytes moved.
    pub fn take_records(
        &self,
        max: usize,
        budget: usize,
        into: &mut Vec<RawRecord>,
    ) -> (usize, usize) {
        let mut state = self.lock();
        let mut moved = 0;
        let mut bytes = 0;
        while moved < max {
            let Some(size) = state.records.front().map(footprint) else {
                break;
            };
            if moved > 0 && bytes + size > budget {
                break;
            }
            let Some(record) = state.records.pop_front() else {
                break;
            };
            bytes += size;
            moved += 1;
            into.push(record);
        }
        state.bytes -= bytes;
        if state.full && state.bytes <= self.limit_bytes / 2 {
            self.wake.notify_one();
        }
        (moved, bytes)
    }

    /// The buffer's bound in bytes.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether a `take` would find records, an error or the end.
    pub fn readable(&self) -> bool {
        let state = self.lock();
        !state.records.is_empty() || state.error.is_some() || state.ended
    }

    /// Whether a read should stop waiting for more: an error or the end.
    pub fn interrupted(&self) -> bool {
        let state = self.lock();
        state.error.is_some() || state.ended
    }

    /// Waits until something arrives (or a stale wake-up: check again).
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Moves the read position (`None`: the earliest record), by the reader
    /// task, which drops everything buffered first. Needs the reader task
    /// running.
    pub async fn seek(&self, offset: Option<i64>) -> Result<(), SourceError> {
        let (reply, done) = oneshot::channel();
        // A seek still waiting is superseded: its caller gets an error.
        let _superseded = self.lock().seek.replace((offset, reply));
        self.wake.notify_one();
        done.await
            .map_err(|_| SourceError::Transient("the partition reader stopped".into()))?
    }

    /// Drops everything buffered; a full buffer no longer holds the
    /// partition paused.
    fn clear(&self) {
        let mut state = self.lock();
        state.records.clear();
        state.bytes = 0;
        state.error = None;
        state.ended = false;
        state.full = false;
        state.next_offset = None;
    }

    /// The partition may be paused at the broker (by an earlier reader of
    /// it): the reader's first look resumes it unless it should stay paused.
    pub fn assume_paused_at_broker(&self) {
        self.lock().paused_at_broker = true;
    }

    /// Pauses the partition whatever the buffer holds (the store is down),
    /// until `release`; done by the reader task.
    pub fn hold(&self) {
        self.lock().held = true;
        self.wake.notify_one();
    }

    pub fn release(&self) {
        self.lock().held = false;
        self.wake.notify_one();
    }
}

/// Bytes a buffered record holds, roughly: its data plus fixed overheads.
fn footprint(record: &RawRecord) -> usize {
    96 + record.topic.len()
        + record.key.as_ref().map_or(0, Vec::len)
        + record.value.as_ref().map_or(0, Vec::len)
        + record
            .headers
            .iter()
            .map(|h| 48 + h.key.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counts {
        pauses: AtomicUsize,
        resumes: AtomicUsize,
        seeks: Mutex<Vec<Option<i64>>>,
    }

    struct Control(Arc<Counts>);

    impl FetchControl for Control {
        fn seek(&self, offset: Option<i64>) -> Result<(), SourceError> {
            self.0.seeks.lock().expect("seeks").push(offset);
            Ok(())
        }
        fn set_paused(&self, paused: bool) -> Result<(), String> {
            let count = if paused {
                &self.0.pauses
            } else {
                &self.0.resumes
            };
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn record(offset: i64, len: usize) -> RawRecord {
        RawRecord {
            topic: "t".into(),
            partition: 0,
            offset,
            key: None,
            value: Some(vec![b'x'; len]),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    fn offsets(ahead: &ReadAhead) -> Vec<i64> {
        let mut records = Vec::new();
        ahead.take(1000, usize::MAX, &mut records);
        records.iter().map(|r| r.offset).collect()
    }

    fn take(ahead: &ReadAhead) -> Taken {
        ahead.take(10, usize::MAX, &mut Vec::new())
    }

    type Feed = futures::channel::mpsc::UnboundedSender<Result<RawRecord, String>>;

    fn reader(
        limit: usize,
    ) -> (
        Arc<ReadAhead>,
        Arc<Counts>,
        Feed,
        tokio::task::JoinHandle<()>,
    ) {
        let counts = Arc::new(Counts::default());
        let ahead = ReadAhead::new(limit, Arc::new(Control(counts.clone())));
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<RawRecord, String>>();
        let task = tokio::spawn(ahead.clone().fill(rx, |r: &RawRecord| r.clone()));
        (ahead, counts, tx, task)
    }

    #[tokio::test]
    async fn pauses_when_full_and_resumes_at_half() {
        // Room for about 10 records of 1,000 bytes.
        let (ahead, counts, tx, task) = reader(10_000);
        for offset in 0..100 {
            tx.unbounded_send(Ok(record(offset, 1_000))).expect("send");
        }
        until("paused when full", || {
            counts.pauses.load(Ordering::SeqCst) == 1
        })
        .await;
        // It stops reading at the bound (the first chunk may overshoot it).
        let buffered = ahead.buffered();
        assert!((10..=READ_CHUNK).contains(&buffered), "{buffered}");
        assert_eq!(counts.resumes.load(Ordering::SeqCst), 0);

        let mut seen = Vec::new();
        while seen.len() < 100 {
            let mut records = Vec::new();
            match ahead.take(7, usize::MAX, &mut records) {
                Taken::Records(_) => seen.extend(records.iter().map(|r| r.offset)),
                Taken::Empty => ahead.arrived().await,
                Taken::Error(e) => panic!("{e}"),
                Taken::Ended => panic!("ended early"),
            }
        }
        assert_eq!(seen, (0..100).collect::<Vec<_>>(), "in order, none lost");
        drop(tx);
        while !ahead.interrupted() {
            ahead.arrived().await;
        }
        assert!(matches!(take(&ahead), Taken::Ended));
        assert!(counts.resumes.load(Ordering::SeqCst) >= 1);
        task.abort();
    }

    #[tokio::test]
    async fn a_seek_drops_what_was_buffered_and_is_done_by_the_reader() {
        let (ahead, counts, tx, task) = reader(1 << 20);
        for offset in 0..5 {
            tx.unbounded_send(Ok(record(offset, 10))).expect("send");
        }
        while ahead.buffered() < 5 {
            ahead.arrived().await;
        }
        ahead.seek(Some(2)).await.expect("seek");
        assert_eq!(*counts.seeks.lock().expect("seeks"), vec![Some(2)]);
        assert!(matches!(take(&ahead), Taken::Empty), "dropped by the seek");
        for offset in 2..4 {
            tx.unbounded_send(Ok(record(offset, 10))).expect("send");
        }
        tx.unbounded_send(Err("broker gone".into())).expect("send");
        while !ahead.interrupted() {
            ahead.arrived().await;
        }
        assert_eq!(offsets(&ahead), vec![2, 3], "records before the error");
        assert!(matches!(take(&ahead), Taken::Error(e) if e == "broker gone"));
        assert!(matches!(take(&ahead), Taken::Empty));
        task.abort();
    }

    #[tokio::test]
    async fn records_fetched_again_after_a_resume_are_dropped_but_not_after_a_seek() {
        let (ahead, _counts, tx, task) = reader(1 << 20);
        // librdkafka resumed from an offset before the last one polled.
        for offset in [0, 1, 2, 3, 2, 3, 4] {
            tx.unbounded_send(Ok(record(offset, 10))).expect("send");
        }
        until("buffered", || ahead.buffered() == 5).await;
        assert_eq!(offsets(&ahead), vec![0, 1, 2, 3, 4]);
        // A seek back is the partition's own: what follows it is kept.
        ahead.seek(Some(1)).await.expect("seek");
        for offset in 1..3 {
            tx.unbounded_send(Ok(record(offset, 10))).expect("send");
        }
        until("buffered after the seek", || ahead.buffered() == 2).await;
        assert_eq!(offsets(&ahead), vec![1, 2]);
        task.abort();
    }

    #[tokio::test]
    async fn a_reader_that_may_find_its_partition_paused_resumes_it_first() {
        let counts = Arc::new(Counts::default());
        let ahead = ReadAhead::new(1 << 20, Arc::new(Control(counts.clone())));
        ahead.assume_paused_at_broker();
        let (_tx, rx) = futures::channel::mpsc::unbounded::<Result<RawRecord, String>>();
        let task = tokio::spawn(ahead.clone().fill(rx, |r: &RawRecord| r.clone()));
        until("resumed", || counts.resumes.load(Ordering::SeqCst) == 1).await;
        assert_eq!(counts.pauses.load(Ordering::SeqCst), 0);
        task.abort();
    }

    /// A queue whose wake-up was turned off: records are there, but polling
    /// it answers `Pending` without keeping the waker, once.
    struct Unwoken {
        records: std::collections::VecDeque<RawRecord>,
        silent: bool,
    }

    impl futures::Stream for Unwoken {
        type Item = Result<RawRecord, String>;

        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if std::mem::take(&mut self.silent) {
                return std::task::Poll::Pending;
            }
            match self.records.pop_front() {
                Some(record) => std::task::Poll::Ready(Some(Ok(record))),
                None => std::task::Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_wake_up_is_found_and_the_reader_returns_to_re_arm() {
        let counts = Arc::new(Counts::default());
        let ahead = ReadAhead::new(1 << 20, Arc::new(Control(counts)));
        let stream = Unwoken {
            records: (0..3).map(|offset| record(offset, 10)).collect(),
            silent: true,
        };
        // Returns (to be given a new handle of the queue) once it has looked
        // at the queue itself and found what was waiting.
        tokio::time::timeout(
            WAKEUP_CHECK * 3,
            ahead.clone().fill(stream, |r: &RawRecord| r.clone()),
        )
        .await
        .expect("the reader noticed the lost wake-up");
        assert_eq!(offsets(&ahead), vec![0, 1, 2], "nothing lost");
    }

    /// Yields until `condition` holds (the reader's calls run on the
    /// blocking pool); fails rather than hanging.
    async fn until(what: &str, condition: impl Fn() -> bool) {
        for _ in 0..1_000_000 {
            if condition() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn a_hold_and_a_full_buffer_pause_once_and_resume_when_both_are_gone() {
        let (ahead, counts, tx, task) = reader(1_000);
        let pauses = || counts.pauses.load(Ordering::SeqCst);
        let resumes = || counts.resumes.load(Ordering::SeqCst);
        ahead.hold();
        until("paused on hold", || pauses() == 1).await;
        tx.unbounded_send(Ok(record(0, 2_000))).expect("send");
        until("the record is buffered", || ahead.buffered() == 1).await;
        ahead.release();
        // Released, but the buffer is full: still paused, never twice.
        ahead.hold();
        ahead.release();
        for _ in 0..1_000 {
            tokio::task::yield_now().await;
        }
        assert_eq!((pauses(), resumes()), (1, 0));
        assert_eq!(offsets(&ahead), vec![0]);
        until("resumed once the buffer drained", || resumes() == 1).await;
        assert_eq!(pauses(), 1);
        task.abort();
    }
}
