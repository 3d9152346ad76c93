//! The one restart policy of the supervision tree, written once: one-for-one
//! restarts with exponential backoff and a budget of restarts per window;
//! past the budget the supervisor escalates to its own parent.
//!
//! ractor has no restart limit of its own, so every supervisor here keeps a
//! [`RestartTracker`] per child and asks it what to do when the child fails.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window` before escalating.
    pub max_restarts: u32,
    pub window: Duration,
    /// Delay before the first restart; doubled for each recent restart.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after `delay`; `generation` counts restarts of this child so a
    /// late restart message for an older incarnation can be ignored.
    Restart { delay: Duration, generation: u64 },
    /// The budget is spent: fail the supervisor so its parent decides.
    Escalate { restarts_in_window: u32 },
}

/// Restart history of one child.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
    generation: u64,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
            generation: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records a failure at `now` and decides what to do.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        while let Some(&oldest) = self.recent.front() {
            if now.duration_since(oldest) >= self.policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        let restarts_in_window = self.recent.len() as u32;
        if restarts_in_window >= self.policy.max_restarts {
            return RestartDecision::Escalate { restarts_in_window };
        }
        self.recent.push_back(now);
        self.generation += 1;
        RestartDecision::Restart {
            delay: backoff(&self.policy, restarts_in_window),
            generation: self.generation,
        }
    }
}

/// `base * 2^n`, capped.
pub fn backoff(policy: &RestartPolicy, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    policy
        .base_backoff
        .saturating_mul(factor)
        .min(policy.max_backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(10),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        }
    }

    #[test]
    fn backs_off_exponentially_then_escalates() {
        let start = Instant::now();
        let mut tracker = RestartTracker::new(policy());
        let table = [
            (
                0,
                RestartDecision::Restart {
                    delay: Duration::from_millis(100),
                    generation: 1,
                },
            ),
            (
                1,
                RestartDecision::Restart {
                    delay: Duration::from_millis(200),
                    generation: 2,
                },
            ),
            (
                2,
                RestartDecision::Restart {
                    delay: Duration::from_millis(250),
                    generation: 3,
                },
            ),
            (
                3,
                RestartDecision::Escalate {
                    restarts_in_window: 3,
                },
            ),
        ];
        for (second, expected) in table {
            assert_eq!(
                tracker.on_failure(start + Duration::from_secs(second)),
                expected,
                "failure at +{second}s"
            );
        }
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let start = Instant::now();
        let mut tracker = RestartTracker::new(policy());
        for s in 0..3 {
            tracker.on_failure(start + Duration::from_secs(s));
        }
        // 10 s after the first restart, only two remain in the window.
        assert_eq!(
            tracker.on_failure(start + Duration::from_secs(10)),
            RestartDecision::Restart {
                delay: Duration::from_millis(250),
                generation: 4
            }
        );
        // Long quiet: the budget is whole again and the backoff resets.
        assert_eq!(
            tracker.on_failure(start + Duration::from_secs(60)),
            RestartDecision::Restart {
                delay: Duration::from_millis(100),
                generation: 5
            }
        );
    }

    #[test]
    fn backoff_saturates() {
        let p = RestartPolicy {
            max_backoff: Duration::from_secs(600),
            ..policy()
        };
        assert_eq!(backoff(&p, 40), Duration::from_secs(600));
    }
}
