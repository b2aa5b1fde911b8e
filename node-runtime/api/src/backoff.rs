//! The one retry policy of both binaries: exponential backoff, the delay doubling from
//! `first` with each attempt up to `max`, with optional jitter downward (so many clients
//! that failed together do not retry in lockstep). A reconcile that failed, a node watch
//! that broke, a Git sync that failed, a container that crashed, a node's long-poll: each
//! names its own bounds and asks this for the wait.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// The wait after `failures` failures in a row: `first` after one (or none), doubling
    /// with each more, never above `max` (nor below `first`, when `max` is smaller).
    pub fn after(&self, failures: u32) -> Duration {
        // 2^31 times anything non-zero is past any max worth having.
        let doublings = failures.saturating_sub(1).min(31);
        self.first
            .saturating_mul(1u32 << doublings)
            .min(self.max.max(self.first))
    }

    /// [`Backoff::after`] shortened by up to half: `unit` is uniform in 0..1 (1 halves it).
    pub fn jittered(&self, failures: u32, unit: f64) -> Duration {
        self.after(failures)
            .mul_f64(1.0 - 0.5 * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn doubles_from_the_first_wait_to_the_max() {
        let b = Backoff::new(S(1), S(300));
        let got: Vec<Duration> = (0..=10).map(|n| b.after(n)).collect();
        assert_eq!(
            got,
            [1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300].map(S).to_vec()
        );
        assert_eq!(b.after(u32::MAX), S(300));
        let ms = Backoff::new(Duration::from_millis(250), S(5));
        assert_eq!(ms.after(3), Duration::from_millis(1000));
        assert_eq!(ms.after(60), S(5));
        // A max below the first wait: the first wait.
        assert_eq!(Backoff::new(S(2), S(1)).after(9), S(2));
    }

    #[test]
    fn jitter_only_shortens_by_up_to_half() {
        let b = Backoff::new(S(1), S(30));
        assert_eq!(b.jittered(4, 0.0), S(8));
        assert_eq!(b.jittered(4, 1.0), S(4));
        assert_eq!(b.jittered(4, 0.5), S(6));
        assert_eq!(b.jittered(4, 7.0), S(4));
    }
}
