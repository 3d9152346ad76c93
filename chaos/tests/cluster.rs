//! The cluster simulation: one scenario per kind of fault, the store
//! conformance suite against the simulated store, determinism, and a
//! planted bug for every invariant checker (each must be caught).
//!
//! Every test prints its seed and the command that replays it.

use std::time::Duration;

use audit_chaos::cluster::invariants::{CHAINS, EXACTLY_ONCE, INFLIGHT, OFFSETS_FORWARD, RESTARTS};
use audit_chaos::cluster::plan::Fault;
use audit_chaos::cluster::{
    replay_command, store_conformance, Bug, PanicPoint, Report, Scenario, BROKER, NODE_A, NODE_B,
    STORE,
};

const SEED: u64 = 20_261_127;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn scenario(faults: Vec<(u64, Fault)>) -> Scenario {
    let mut s = Scenario::quiet(SEED);
    s.partitions = 4;
    s.records_per_partition = 150;
    s.faults = faults.into_iter().map(|(at, f)| (ms(at), f)).collect();
    s
}

fn run(scenario: &Scenario) -> Report {
    print!("{}", scenario.describe());
    println!("replay the sweep's seed: {}", replay_command(scenario.seed));
    let report = scenario
        .run()
        .unwrap_or_else(|e| panic!("seed {}: {e}", scenario.seed));
    println!("{}", report.summary());
    report
}

/// How often the clients saw `what` ("write failed", "fetch failed", "fenced").
fn seen(report: &Report, what: &str) -> u64 {
    report.counts.get(what).copied().unwrap_or(0)
}

/// Runs and requires every invariant to hold.
fn run_clean(scenario: &Scenario) -> Report {
    let report = run(scenario);
    let violations = report.violations();
    if !violations.is_empty() {
        for line in &report.trace {
            println!("  {line}");
        }
        panic!("seed {}: {violations:#?}", scenario.seed);
    }
    report
}

/// Runs with a planted bug and requires `checker` to report it.
fn run_caught(mut scenario: Scenario, bug: Bug, checker: &str) -> Report {
    scenario.bug = Some(bug);
    let report = run(&scenario);
    let violations = report.violations();
    println!("caught: {violations:#?}");
    assert!(
        report.db.bug_fired() > 0 || matches!(bug, Bug::RestartStorm | Bug::UnboundedInflight),
        "the planted bug {bug:?} never fired"
    );
    assert!(
        violations.iter().any(|v| v.starts_with(checker)),
        "planted bug {bug:?} not caught by the {checker} checker: {violations:#?}"
    );
    report
}

#[test]
fn store_conforms_over_turmoil() {
    store_conformance().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn same_seed_same_run() {
    let seed = 7;
    let a = Scenario::from_seed(seed).run().expect("first run");
    let b = Scenario::from_seed(seed).run().expect("second run");
    assert!(a.trace.len() > 20, "a trace worth comparing");
    if let Some(i) =
        (0..a.trace.len().max(b.trace.len())).find(|&i| a.trace.get(i) != b.trace.get(i))
    {
        panic!(
            "seed {seed}: the traces differ at line {i}:\n  first:  {:?}\n  second: {:?}",
            a.trace.get(i),
            b.trace.get(i)
        );
    }
    assert_eq!(a.digest(), b.digest());
    let c = Scenario::from_seed(seed + 1).run().expect("another seed");
    assert_ne!(a.digest(), c.digest(), "another seed, another run");
}

#[test]
fn quiet_run_stores_everything() {
    let report = run_clean(&scenario(Vec::new()));
    assert!(report.completed);
}

/// Timeline:
///   300 ms  the store host crashes: open transactions and sessions are gone
///   +400 ms the store restarts from its disk; writers retry, a write whose
///           commit was lost is redone, one whose answer was lost is fenced
#[test]
fn store_crash_loses_only_open_transactions() {
    let report = run_clean(&scenario(vec![(300, Fault::StoreCrash { down: ms(400) })]));
    let boots = report
        .trace
        .iter()
        .filter(|l| l.contains("store: boot"))
        .count();
    assert_eq!(boots, 2, "the store restarted once");
    assert!(seen(&report, "write failed") > 0, "the crash failed writes");
}

/// Timeline:
///   250 ms  node-a crashes: actors, positions and batches in memory lost
///   +700 ms node-a starts again and resumes from the stored offsets
#[test]
fn node_crash_loses_memory_not_records() {
    let report = run_clean(&scenario(vec![(
        250,
        Fault::NodeCrash {
            node: NODE_A,
            down: ms(700),
        },
    )]));
    assert_eq!(report.boots.get(NODE_A), Some(&2));
}

/// Timeline:
///   200 ms  the broker crashes (the producer stops with it, logs are kept)
///   +500 ms it restarts; fetches time out meanwhile (transient errors)
#[test]
fn broker_crash_is_transient() {
    let report = run_clean(&scenario(vec![(200, Fault::BrokerCrash { down: ms(500) })]));
    assert!(report.trace.iter().any(|l| l.contains("broker: boot 2")));
    assert!(
        seen(&report, "fetch failed") > 0,
        "the crash failed fetches"
    );
}

/// Timeline:
///   200 ms  node-a is cut off from the store for 600 ms: writes time out,
///           the partition pauses at the broker and retries with backoff
///   400 ms  node-b's messages to the broker are held 300 ms, then arrive
///           at once (late fetches are discarded with their connection)
///   600 ms  the link node-b <-> store is 150 ms slower for 500 ms
#[test]
fn partitions_holds_and_delays_heal() {
    let report = run_clean(&scenario(vec![
        (
            200,
            Fault::Partition {
                a: NODE_A,
                b: STORE,
                heal_after: ms(600),
            },
        ),
        (
            400,
            Fault::Hold {
                a: NODE_B,
                b: BROKER,
                release_after: ms(300),
            },
        ),
        (
            600,
            Fault::Delay {
                a: NODE_B,
                b: STORE,
                latency: ms(150),
                heal_after: ms(500),
            },
        ),
    ]));
    assert!(
        seen(&report, "write failed") > 0,
        "the partition failed writes"
    );
    assert!(seen(&report, "fetch failed") > 0, "the hold failed fetches");
}

/// Timeline:
///   100 ms  every store answer takes 250 ms more, for 1.5 s: batches wait
///           for permits, partitions stop fetching, nothing piles up
#[test]
fn slow_store_keeps_in_flight_bounded() {
    let report = run_clean(&scenario(vec![(
        100,
        Fault::SlowStore {
            delay: ms(250),
            heal_after: ms(1500),
        },
    )]));
    let bounds = Scenario::bounds();
    assert!(report
        .load
        .values()
        .all(|l| l.max_writes <= bounds.max_inflight_batches));
}

/// Timeline:
///   150 ms  a partition actor of node-a panics fetching the rest of a batch
///   300 ms  one of node-b panics with its rows sent and not committed: the
///           transaction dies with the connection; both restart with backoff
#[test]
fn partition_actor_panics_mid_batch() {
    let report = run_clean(&scenario(vec![
        (
            150,
            Fault::Panic {
                node: NODE_A,
                partition: None,
                point: PanicPoint::Fetch,
                times: 1,
            },
        ),
        (
            300,
            Fault::Panic {
                node: NODE_B,
                partition: None,
                point: PanicPoint::BeforeCommit,
                times: 1,
            },
        ),
    ]));
    assert_eq!(report.panics_fired, 2);
}

/// Timeline:
///   300 ms  partition 0 is assigned to node-b while node-a still owns it
///   +400 ms node-a lets it go; meanwhile both write it, fenced by offset
#[test]
fn rebalance_with_overlap_is_fenced() {
    let report = run_clean(&scenario(vec![(
        300,
        Fault::Rebalance {
            partition: 0,
            from: NODE_A,
            to: NODE_B,
            overlap: ms(400),
        },
    )]));
    assert!(seen(&report, "fenced") > 0, "both owners wrote");
}

/// Planted: the store moves the offset when the rows arrive. A partition
/// actor panics between rows and commit: the offset moved, the rows did
/// not, and the restarted actor skips them.
#[test]
fn planted_offset_before_rows_is_caught() {
    let s = scenario(vec![(
        300,
        Fault::Panic {
            node: NODE_A,
            partition: None,
            point: PanicPoint::BeforeCommit,
            times: 1,
        },
    )]);
    let report = run_caught(s, Bug::OffsetBeforeRows, EXACTLY_ONCE);
    assert!(report
        .violations()
        .iter()
        .any(|v| v.contains(": lost (expected one")));
}

/// Planted: the store links one event as if its chain were empty.
#[test]
fn planted_broken_chain_link_is_caught() {
    run_caught(scenario(Vec::new()), Bug::SkipChainLink, CHAINS);
}

/// Planted: the store does not fence; during a rebalance's overlap the old
/// owner's write moves the offset back.
#[test]
fn planted_missing_fencing_is_caught() {
    let s = scenario(vec![(
        300,
        Fault::Rebalance {
            partition: 0,
            from: NODE_A,
            to: NODE_B,
            overlap: ms(400),
        },
    )]);
    run_caught(s, Bug::NoFencing, OFFSETS_FORWARD);
}

/// Planted: the store writes one batch back to front.
#[test]
fn planted_reordered_batch_is_caught() {
    let report = run_caught(scenario(Vec::new()), Bug::ReverseOneBatch, EXACTLY_ONCE);
    let violations = report.violations();
    assert!(violations.iter().any(|v| v.contains("stored after offset")));
    assert!(violations.iter().any(|v| v.starts_with(CHAINS)));
}

/// Planted: the supervisors restart without limit or backoff while a
/// partition actor panics six times.
#[test]
fn planted_restart_storm_is_caught() {
    let s = scenario(vec![(
        200,
        Fault::Panic {
            node: NODE_A,
            partition: Some(0),
            point: PanicPoint::Fetch,
            times: 6,
        },
    )]);
    let report = run_caught(s, Bug::RestartStorm, RESTARTS);
    assert_eq!(report.panics_fired, 6);
}

/// Planted: the node takes no in-flight permits; three partitions on one
/// node write at once into a slow store.
#[test]
fn planted_unbounded_inflight_is_caught() {
    let mut s = scenario(vec![(
        100,
        Fault::SlowStore {
            delay: ms(100),
            heal_after: ms(1500),
        },
    )]);
    s.partitions = 6;
    run_caught(s, Bug::UnboundedInflight, INFLIGHT);
}
