//! Rise/fall counting of consecutive probe results.
//!
//! A probe only says pass or fail; this state machine decides when a node flips, so one missed
//! probe never takes a node down and one lucky probe never brings a flapping node back.

use serde::{Deserialize, Serialize};

/// How many consecutive results flip a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Consecutive passes that bring a down node up.
    pub rise: u32,
    /// Consecutive failures that take an up node down.
    pub fall: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { rise: 2, fall: 3 }
    }
}

/// A change of health reported by [`HealthState::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The node just became healthy.
    Up,
    /// The node just became unhealthy.
    Down,
}

/// The health of one node, driven by probe results.
#[derive(Debug, Clone)]
pub struct HealthState {
    thresholds: Thresholds,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    /// Every result seen, for metrics.
    observed: u64,
}

impl HealthState {
    /// A new state; `healthy` is the assumption before any probe has run.
    pub fn new(thresholds: Thresholds, healthy: bool) -> Self {
        let thresholds = Thresholds {
            rise: thresholds.rise.max(1),
            fall: thresholds.fall.max(1),
        };
        HealthState {
            thresholds,
            healthy,
            streak: 0,
            observed: 0,
        }
    }

    /// Whether the node is currently considered healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// How many probe results have been observed.
    pub fn observed(&self) -> u64 {
        self.observed
    }

    /// Consecutive results so far that point away from the current state.
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// Changes the thresholds (on reload) without losing the current state.
    pub fn set_thresholds(&mut self, thresholds: Thresholds) {
        self.thresholds = Thresholds {
            rise: thresholds.rise.max(1),
            fall: thresholds.fall.max(1),
        };
    }

    /// Records one probe result; returns the transition it caused, if any.
    pub fn observe(&mut self, passed: bool) -> Option<Transition> {
        self.observed += 1;
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy {
            self.thresholds.fall
        } else {
            self.thresholds.rise
        };
        if self.streak < needed {
            return None;
        }
        self.healthy = passed;
        self.streak = 0;
        Some(if passed { Transition::Up } else { Transition::Down })
    }

    /// Forces the state (e.g. an operator marking a node down); the streak restarts.
    pub fn force(&mut self, healthy: bool) {
        self.healthy = healthy;
        self.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut HealthState, results: &[bool]) -> Vec<Option<Transition>> {
        results.iter().map(|&r| state.observe(r)).collect()
    }

    #[test]
    fn falls_after_fall_consecutive_failures() {
        let mut s = HealthState::new(Thresholds { rise: 2, fall: 3 }, true);
        assert_eq!(run(&mut s, &[false, false]), vec![None, None]);
        assert!(s.is_healthy());
        assert_eq!(s.observe(false), Some(Transition::Down));
        assert!(!s.is_healthy());
        assert_eq!(s.observe(false), None);
    }

    #[test]
    fn a_pass_resets_the_failure_streak() {
        let mut s = HealthState::new(Thresholds { rise: 2, fall: 3 }, true);
        assert_eq!(run(&mut s, &[false, false, true, false, false]), vec![None; 5]);
        assert!(s.is_healthy());
        assert_eq!(s.streak(), 2);
    }

    #[test]
    fn rises_after_rise_consecutive_passes() {
        let mut s = HealthState::new(Thresholds { rise: 2, fall: 1 }, false);
        assert_eq!(run(&mut s, &[true, false, true]), vec![None, None, None]);
        assert_eq!(s.observe(true), Some(Transition::Up));
        assert!(s.is_healthy());
        assert_eq!(s.observe(false), Some(Transition::Down));
        assert_eq!(s.observed(), 5);
    }

    #[test]
    fn zero_thresholds_are_treated_as_one() {
        let mut s = HealthState::new(Thresholds { rise: 0, fall: 0 }, true);
        assert_eq!(s.observe(false), Some(Transition::Down));
        assert_eq!(s.observe(true), Some(Transition::Up));
    }

    #[test]
    fn force_and_reload_keep_state_consistent() {
        let mut s = HealthState::new(Thresholds::default(), true);
        s.observe(false);
        s.force(false);
        assert!(!s.is_healthy());
        assert_eq!(s.streak(), 0);
        s.set_thresholds(Thresholds { rise: 1, fall: 1 });
        assert_eq!(s.observe(true), Some(Transition::Up));
    }
}
