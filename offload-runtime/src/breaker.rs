//! A per-function circuit breaker: after `failures` worker-side failures in a row it opens
//! and refuses calls at once; after `reset` it lets one trial call through (half-open), and
//! closes again if that call succeeds.
//!
//! Worker-side failures are the ones the function's own execution causes: `Timeout` of a
//! running call, `Panicked`, `Crashed` and `MemoryLimit`. Waiting too long in the queue,
//! overload, shutdown and configuration errors say nothing about the function and neither
//! count nor reset the count.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::settings::BreakerConfig;
use crate::stats::BreakerState;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial: bool },
}

/// One function's breaker. `const`-constructible so it can live in the function's entry.
pub(crate) struct Breaker {
    state: Mutex<State>,
}

/// Whether a call may go through, and if so whether it is the half-open trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Pass,
    Trial,
    /// Refused: the breaker is open (or its trial is in flight) for about this long yet.
    Refuse(Duration),
}

/// A state change worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Opened,
    HalfOpened,
    Closed,
}

impl Breaker {
    pub(crate) const fn new() -> Breaker {
        Breaker { state: Mutex::new(State::Closed { failures: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides whether a call may start now.
    pub(crate) fn admit(&self, config: BreakerConfig) -> (Admission, Option<Transition>) {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => (Admission::Pass, None),
            State::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *state = State::HalfOpen { trial: true };
                    (Admission::Trial, Some(Transition::HalfOpened))
                } else {
                    (Admission::Refuse(until - now), None)
                }
            }
            State::HalfOpen { trial: true } => (Admission::Refuse(config.reset), None),
            State::HalfOpen { trial: false } => {
                *state = State::HalfOpen { trial: true };
                (Admission::Trial, None)
            }
        }
    }

    /// Records how an admitted call ended: `Some(true)` success, `Some(false)` worker-side
    /// failure, `None` neither (the trial slot is given back).
    pub(crate) fn record(
        &self,
        config: BreakerConfig,
        admission: Admission,
        outcome: Option<bool>,
    ) -> Option<Transition> {
        let mut state = self.lock();
        match (*state, outcome) {
            (State::Closed { .. }, Some(true)) => {
                *state = State::Closed { failures: 0 };
                None
            }
            (State::Closed { failures }, Some(false)) => {
                let failures = failures + 1;
                if failures >= config.failures {
                    *state = State::Open { until: Instant::now() + config.reset };
                    Some(Transition::Opened)
                } else {
                    *state = State::Closed { failures };
                    None
                }
            }
            (State::HalfOpen { .. }, Some(true)) if admission == Admission::Trial => {
                *state = State::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            (State::HalfOpen { .. }, Some(false)) if admission == Admission::Trial => {
                *state = State::Open { until: Instant::now() + config.reset };
                Some(Transition::Opened)
            }
            (State::HalfOpen { .. }, None) if admission == Admission::Trial => {
                *state = State::HalfOpen { trial: false };
                None
            }
            // A call admitted before the breaker opened, ending now, changes nothing.
            _ => None,
        }
    }

    /// For a call admitted while the breaker was closed that has waited for a worker since:
    /// whether the breaker opened meanwhile, and for how long yet. Such a call is refused
    /// rather than sent to a worker, so calls queued behind a poison input do not all run.
    pub(crate) fn opened_since(&self) -> Option<Duration> {
        match *self.lock() {
            State::Open { until } => until.checked_duration_since(Instant::now()),
            State::HalfOpen { .. } | State::Closed { .. } => None,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { failures } => BreakerState::Closed { failures },
            State::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig { failures: 3, reset: Duration::from_millis(50) };

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
        let breaker = Breaker::new();
        for _ in 0..2 {
            let (a, _) = breaker.admit(CONFIG);
            assert_eq!(breaker.record(CONFIG, a, Some(false)), None);
        }
        // A success resets the count.
        let (a, _) = breaker.admit(CONFIG);
        breaker.record(CONFIG, a, Some(true));
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
        for i in 0..3 {
            let (a, _) = breaker.admit(CONFIG);
            let t = breaker.record(CONFIG, a, Some(false));
            assert_eq!(t, (i == 2).then_some(Transition::Opened));
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(matches!(breaker.admit(CONFIG).0, Admission::Refuse(_)));

        std::thread::sleep(CONFIG.reset);
        let (trial, t) = breaker.admit(CONFIG);
        assert_eq!((trial, t), (Admission::Trial, Some(Transition::HalfOpened)));
        assert!(matches!(breaker.admit(CONFIG).0, Admission::Refuse(_)), "one trial at a time");
        assert_eq!(breaker.record(CONFIG, trial, Some(true)), Some(Transition::Closed));
        assert_eq!(breaker.admit(CONFIG).0, Admission::Pass);
    }

    #[test]
    fn a_failed_trial_opens_again_and_a_neutral_one_frees_the_slot() {
        let breaker = Breaker::new();
        for _ in 0..3 {
            let (a, _) = breaker.admit(CONFIG);
            breaker.record(CONFIG, a, Some(false));
        }
        std::thread::sleep(CONFIG.reset);
        let (trial, _) = breaker.admit(CONFIG);
        assert_eq!(breaker.record(CONFIG, trial, None), None);
        let (trial, _) = breaker.admit(CONFIG);
        assert_eq!(trial, Admission::Trial, "the slot was given back");
        assert_eq!(breaker.record(CONFIG, trial, Some(false)), Some(Transition::Opened));
        assert_eq!(breaker.state(), BreakerState::Open);
    }
}
