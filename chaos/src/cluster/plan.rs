//! The fault schedule of a run, drawn from its seed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ms, PanicPoint, BROKER, NODES, NODE_A, NODE_B, STORE};

/// Hosts a network fault can cut apart.
pub const HOSTS: [&str; 4] = [NODE_A, NODE_B, BROKER, STORE];

/// A fault, starting at its time in the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every message between `a` and `b` is dropped, until repaired.
    Partition {
        a: &'static str,
        b: &'static str,
        heal_after: Duration,
    },
    /// Messages between `a` and `b` are held, then delivered all at once.
    Hold {
        a: &'static str,
        b: &'static str,
        release_after: Duration,
    },
    /// Messages between `a` and `b` take `latency` longer.
    Delay {
        a: &'static str,
        b: &'static str,
        latency: Duration,
        heal_after: Duration,
    },
    /// The store host crashes (open transactions are lost) and restarts.
    StoreCrash { down: Duration },
    /// A node crashes (all its memory lost) and restarts.
    NodeCrash { node: &'static str, down: Duration },
    /// The broker crashes; its logs are on disk.
    BrokerCrash { down: Duration },
    /// Every store answer takes `delay` longer.
    SlowStore {
        delay: Duration,
        heal_after: Duration,
    },
    /// A partition actor of `node` panics mid-batch, `times` times.
    Panic {
        node: &'static str,
        partition: Option<i32>,
        point: PanicPoint,
        times: u32,
    },
    /// `partition` moves to node `to`; its old owner lets go `overlap`
    /// later, so both own it in between.
    Rebalance {
        partition: i32,
        from: &'static str,
        to: &'static str,
        overlap: Duration,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Partition { a, b, heal_after } => {
                write!(f, "partition {a} <-> {b} for {heal_after:?}")
            }
            Fault::Hold {
                a,
                b,
                release_after,
            } => {
                write!(f, "hold messages {a} <-> {b} for {release_after:?}")
            }
            Fault::Delay {
                a,
                b,
                latency,
                heal_after,
            } => write!(f, "delay {a} <-> {b} by {latency:?} for {heal_after:?}"),
            Fault::StoreCrash { down } => write!(f, "store crash, down {down:?}"),
            Fault::NodeCrash { node, down } => write!(f, "{node} crash, down {down:?}"),
            Fault::BrokerCrash { down } => write!(f, "broker crash, down {down:?}"),
            Fault::SlowStore { delay, heal_after } => {
                write!(f, "slow store (+{delay:?} per answer) for {heal_after:?}")
            }
            Fault::Panic {
                node,
                partition,
                point,
                times,
            } => write!(
                f,
                "{node} partition {} panics {point:?} x{times}",
                partition.map_or("any".to_string(), |p| p.to_string())
            ),
            Fault::Rebalance {
                partition,
                from,
                to,
                overlap,
            } => write!(
                f,
                "rebalance partition {partition} {from} -> {to}, overlap {overlap:?}"
            ),
        }
    }
}

/// A primitive step of the schedule, applied between simulation steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Partition(&'static str, &'static str),
    Repair(&'static str, &'static str),
    Hold(&'static str, &'static str),
    Release(&'static str, &'static str),
    Latency(&'static str, &'static str, Duration),
    Crash(&'static str),
    Bounce(&'static str),
    Slow(Option<Duration>),
    ArmPanic {
        node: &'static str,
        partition: Option<i32>,
        point: PanicPoint,
        times: u32,
    },
    Assign(i32, &'static str),
    Revoke(i32, &'static str),
}

/// Initial owners: partitions dealt round-robin over the nodes.
pub fn initial_owners(partitions: usize) -> BTreeMap<i32, Vec<&'static str>> {
    (0..partitions as i32)
        .map(|p| (p, vec![NODES[p as usize % NODES.len()]]))
        .collect()
}

/// `count` faults at times in `window`, drawn from `seed`.
pub fn draw(
    seed: u64,
    partitions: usize,
    count: usize,
    window: Duration,
) -> Vec<(Duration, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut owners: BTreeMap<i32, &'static str> = initial_owners(partitions)
        .into_iter()
        .map(|(p, o)| (p, o[0]))
        .collect();
    let mut times: Vec<Duration> = (0..count)
        .map(|_| ms(rng.gen_range(100..window.as_millis().max(101) as u64)))
        .collect();
    times.sort();
    // Network faults on one pair do not overlap (turmoil cannot combine a
    // hold with a partition of the same link).
    let mut link_busy: BTreeMap<(&str, &str), Duration> = BTreeMap::new();
    // Nor do two rebalances of one partition: the second would be undone
    // by the first one's late revoke, leaving the partition to nobody.
    let mut moving: BTreeMap<i32, Duration> = BTreeMap::new();
    let mut faults = Vec::new();
    for at in times {
        let fault = loop {
            let fault = draw_one(&mut rng, partitions, &owners);
            if let Some((a, b, lasts)) = link_of(&fault) {
                let pair = if a < b { (a, b) } else { (b, a) };
                if link_busy.get(&pair).is_some_and(|&until| until > at) {
                    continue;
                }
                link_busy.insert(pair, at + lasts);
            }
            if let Fault::Rebalance {
                partition, overlap, ..
            } = &fault
            {
                if moving.get(partition).is_some_and(|&until| until >= at) {
                    continue;
                }
                moving.insert(*partition, at + *overlap);
            }
            break fault;
        };
        if let Fault::Rebalance { partition, to, .. } = &fault {
            owners.insert(*partition, to);
        }
        faults.push((at, fault));
    }
    faults
}

fn link_of(fault: &Fault) -> Option<(&'static str, &'static str, Duration)> {
    match *fault {
        Fault::Partition { a, b, heal_after } => Some((a, b, heal_after)),
        Fault::Hold {
            a,
            b,
            release_after,
        } => Some((a, b, release_after)),
        Fault::Delay {
            a, b, heal_after, ..
        } => Some((a, b, heal_after)),
        _ => None,
    }
}

fn pair(rng: &mut StdRng) -> (&'static str, &'static str) {
    let a = rng.gen_range(0..HOSTS.len());
    let b = (a + rng.gen_range(1..HOSTS.len())) % HOSTS.len();
    (HOSTS[a], HOSTS[b])
}

fn draw_one(rng: &mut StdRng, partitions: usize, owners: &BTreeMap<i32, &'static str>) -> Fault {
    let node = NODES[rng.gen_range(0..NODES.len())];
    match rng.gen_range(0..10) {
        0 => {
            let (a, b) = pair(rng);
            Fault::Partition {
                a,
                b,
                heal_after: ms(rng.gen_range(50..800)),
            }
        }
        1 => {
            let (a, b) = pair(rng);
            Fault::Hold {
                a,
                b,
                release_after: ms(rng.gen_range(50..600)),
            }
        }
        2 => {
            let (a, b) = pair(rng);
            Fault::Delay {
                a,
                b,
                latency: ms(rng.gen_range(20..200)),
                heal_after: ms(rng.gen_range(100..800)),
            }
        }
        3 => Fault::StoreCrash {
            down: ms(rng.gen_range(50..800)),
        },
        4 => Fault::NodeCrash {
            node,
            down: ms(rng.gen_range(100..1500)),
        },
        5 => Fault::BrokerCrash {
            down: ms(rng.gen_range(50..800)),
        },
        6 => Fault::SlowStore {
            delay: ms(rng.gen_range(20..300)),
            heal_after: ms(rng.gen_range(200..1000)),
        },
        7 => Fault::Panic {
            node,
            partition: None,
            point: if rng.gen_bool(0.5) {
                PanicPoint::Fetch
            } else {
                PanicPoint::BeforeCommit
            },
            times: 1,
        },
        _ => {
            let partition = rng.gen_range(0..partitions as i32);
            let from = owners.get(&partition).copied().unwrap_or(NODE_A);
            let to = if from == NODE_A { NODE_B } else { NODE_A };
            Fault::Rebalance {
                partition,
                from,
                to,
                overlap: ms(rng.gen_range(0..500)),
            }
        }
    }
}

/// The faults as primitive actions, in time order (stable for equal times).
pub fn actions(faults: &[(Duration, Fault)]) -> Vec<(Duration, Action)> {
    let mut out = Vec::new();
    for (at, fault) in faults {
        let at = *at;
        match fault.clone() {
            Fault::Partition { a, b, heal_after } => {
                out.push((at, Action::Partition(a, b)));
                out.push((at + heal_after, Action::Repair(a, b)));
            }
            Fault::Hold {
                a,
                b,
                release_after,
            } => {
                out.push((at, Action::Hold(a, b)));
                out.push((at + release_after, Action::Release(a, b)));
            }
            Fault::Delay {
                a,
                b,
                latency,
                heal_after,
            } => {
                out.push((at, Action::Latency(a, b, latency)));
                out.push((at + heal_after, Action::Latency(a, b, Duration::ZERO)));
            }
            Fault::StoreCrash { down } => {
                out.push((at, Action::Crash(STORE)));
                out.push((at + down, Action::Bounce(STORE)));
            }
            Fault::NodeCrash { node, down } => {
                out.push((at, Action::Crash(node)));
                out.push((at + down, Action::Bounce(node)));
            }
            Fault::BrokerCrash { down } => {
                out.push((at, Action::Crash(BROKER)));
                out.push((at + down, Action::Bounce(BROKER)));
            }
            Fault::SlowStore { delay, heal_after } => {
                out.push((at, Action::Slow(Some(delay))));
                out.push((at + heal_after, Action::Slow(None)));
            }
            Fault::Panic {
                node,
                partition,
                point,
                times,
            } => out.push((
                at,
                Action::ArmPanic {
                    node,
                    partition,
                    point,
                    times,
                },
            )),
            Fault::Rebalance {
                partition,
                from,
                to,
                overlap,
            } => {
                out.push((at, Action::Assign(partition, to)));
                out.push((at + overlap, Action::Revoke(partition, from)));
            }
        }
    }
    out.sort_by_key(|(at, _)| *at);
    out
}
