//! The seed sweep of the cluster simulation (its own main, not libtest's,
//! so that `--seed N` is an argument it understands).
//!
//! ```text
//! cargo test -p chaos --test sim                          # 200 seeds (CI)
//! cargo test -p chaos --test sim -- --seed 17             # replay one seed, with its timeline
//! CHAOS_SEED=17 cargo test -p chaos --test sim            # the same
//! CHAOS_SEEDS=10000 cargo test --release -p chaos --test sim   # soak
//! ```
//! `CHAOS_SEED_BASE` (default 1) is the first seed of a sweep,
//! `CHAOS_WORKERS` the number of threads (default: the cores, at most 4),
//! `CHAOS_BUG` plants a bug in every run (`offset-before-rows`,
//! `skip-chain-link`, `no-fencing`, `reverse-one-batch`, `restart-storm`,
//! `unbounded-inflight`): the sweep must then fail.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use std::collections::BTreeMap;

use audit_chaos::cluster::observe::ActorEventKind;
use audit_chaos::cluster::{replay_command, Bug, Report, Scenario};

const DEFAULT_SEEDS: u64 = 200;

fn main() -> ExitCode {
    quiet_injected_panics();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        // For test runners that list tests first (cargo nextest).
        if !args.iter().any(|a| a == "--ignored") {
            println!("sweep: test");
        }
        return ExitCode::SUCCESS;
    }
    if skipped(&args) {
        println!("running 0 tests (the seed sweep is filtered out)");
        return ExitCode::SUCCESS;
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seed = flag("--seed").or_else(|| std::env::var("CHAOS_SEED").ok());
    if let Some(seed) = seed {
        return match parse(&seed) {
            Some(seed) => replay(seed),
            None => {
                eprintln!("not a seed: {seed:?}");
                ExitCode::FAILURE
            }
        };
    }
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| parse(&v))
            .unwrap_or(default)
    };
    let base = env("CHAOS_SEED_BASE", 1);
    let count = env("CHAOS_SEEDS", DEFAULT_SEEDS);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    let workers = env("CHAOS_WORKERS", cores.min(4)).max(1);
    sweep(base, count, workers)
}

/// Whether libtest-style arguments leave the sweep out: `--ignored` (it is
/// not an ignored test) or a name filter it does not match.
fn skipped(args: &[String]) -> bool {
    const WITH_VALUE: &[&str] = &[
        "--seed",
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "--shuffle-seed",
        "-Z",
    ];
    if args.iter().any(|a| a == "--ignored") {
        return true;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let mut filters = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if WITH_VALUE.contains(&a.as_str()) {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            filters.push(a.as_str());
        }
        i += 1;
    }
    !filters.is_empty()
        && !filters.iter().any(|f| {
            if exact {
                *f == "sweep"
            } else {
                "sweep".contains(f)
            }
        })
}

/// Injected panics are part of the plan: not worth a backtrace each.
fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        if message.is_some_and(|m| m.starts_with("injected panic")) {
            return;
        }
        default(info)
    }));
}

fn parse(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The command that replays `seed`, with the planted bug if there is one.
fn command(seed: u64) -> String {
    match std::env::var("CHAOS_BUG") {
        Ok(bug) if !bug.is_empty() => format!("CHAOS_BUG={bug} {}", replay_command(seed)),
        _ => replay_command(seed),
    }
}

/// The scenario of `seed`, with the bug `CHAOS_BUG` names, if any.
fn scenario(seed: u64) -> Scenario {
    let mut scenario = Scenario::from_seed(seed);
    scenario.bug = match std::env::var("CHAOS_BUG").ok().as_deref() {
        Some("offset-before-rows") => Some(Bug::OffsetBeforeRows),
        Some("skip-chain-link") => Some(Bug::SkipChainLink),
        Some("no-fencing") => Some(Bug::NoFencing),
        Some("reverse-one-batch") => Some(Bug::ReverseOneBatch),
        Some("restart-storm") => Some(Bug::RestartStorm),
        Some("unbounded-inflight") => Some(Bug::UnboundedInflight),
        Some(other) if !other.is_empty() => panic!("CHAOS_BUG={other:?} is no planted bug"),
        _ => None,
    };
    scenario
}

/// One seed, in full: its fault timeline, the run's trace, the verdict.
fn replay(seed: u64) -> ExitCode {
    let scenario = scenario(seed);
    print!("{}", scenario.describe());
    let report = match scenario.run() {
        Ok(report) => report,
        Err(e) => {
            println!("seed {seed}: {e}\nreplay: {}", command(seed));
            return ExitCode::FAILURE;
        }
    };
    for line in &report.trace {
        println!("  {line}");
    }
    println!("{}", report.summary());
    println!("digest {}", report.digest());
    let violations = report.violations();
    if violations.is_empty() {
        println!("seed {seed}: every invariant holds");
        return ExitCode::SUCCESS;
    }
    println!("seed {seed}: {} violation(s):", violations.len());
    for v in &violations {
        println!("  {v}");
    }
    println!("replay: {}", command(seed));
    ExitCode::FAILURE
}

fn sweep(base: u64, count: u64, workers: u64) -> ExitCode {
    let started = Instant::now();
    println!(
        "chaos sweep: seeds {base}..{} on {workers} threads",
        base + count - 1
    );
    let next = AtomicU64::new(0);
    let failures: Mutex<Vec<String>> = Mutex::default();
    let totals: Mutex<BTreeMap<String, u64>> = Mutex::default();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count {
                    return;
                }
                let seed = base + i;
                if let Some(failure) = run_one(seed, &totals) {
                    println!("{failure}");
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(failure);
                }
                if (i + 1) % 50 == 0 {
                    println!("  {} seeds done after {:?}", i + 1, started.elapsed());
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    let totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    println!("  what the faults did: {totals:?}");
    println!(
        "chaos sweep: {count} seeds, {} failed, in {:?}",
        failures.len(),
        started.elapsed()
    );
    // libtest's summary line, one test per seed, for tools that sum them.
    println!(
        "test result: {}. {} passed; {} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        if failures.is_empty() { "ok" } else { "FAILED" },
        count - failures.len() as u64,
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What the faults did, summed over the sweep: a sweep whose faults never
/// bite proves little.
fn add_totals(scenario: &Scenario, report: &Report, totals: &Mutex<BTreeMap<String, u64>>) {
    let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
    for (what, n) in &report.counts {
        *totals.entry((*what).to_string()).or_default() += n;
    }
    *totals.entry("faults".into()).or_default() += scenario.faults.len() as u64;
    *totals.entry("panics".into()).or_default() += u64::from(report.panics_fired);
    let restarts = report
        .actor_events
        .iter()
        .filter(|e| matches!(e.kind, ActorEventKind::RestartScheduled { .. }))
        .count();
    *totals.entry("actor restarts".into()).or_default() += restarts as u64;
    let node_restarts: u32 = report.boots.values().map(|b| b.saturating_sub(1)).sum();
    *totals.entry("host restarts".into()).or_default() += u64::from(node_restarts);
    *totals.entry("commits".into()).or_default() += report.db.moves().len() as u64;
}

/// A failure's description with its seed and replay command, or `None`.
fn run_one(seed: u64, totals: &Mutex<BTreeMap<String, u64>>) -> Option<String> {
    let scenario = scenario(seed);
    let outcome = catch_unwind(AssertUnwindSafe(|| scenario.run()));
    let problem = match outcome {
        Ok(Ok(report)) => {
            add_totals(&scenario, &report, totals);
            let violations = report.violations();
            if violations.is_empty() {
                return None;
            }
            violations
                .iter()
                .take(5)
                .map(|v| format!("    {v}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Ok(Err(e)) => format!("    {e}"),
        Err(panic) => format!(
            "    panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        ),
    };
    Some(format!(
        "FAILED seed {seed}:\n{problem}\n  replay: {}",
        command(seed)
    ))
}
