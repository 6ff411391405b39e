//! Exponential backoff with full jitter: the n-th retry waits a uniform random time in
//! `[0, min(cap, base * 2^n)]` (the "full jitter" of the AWS architecture blog), so a fleet
//! that lost its server does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// First ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Largest ceiling.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_BASE, BACKOFF_CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, and one step further for the one after.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=ms))
    }

    /// After a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ceilings_double_from_one_second_up_to_a_minute() {
        let mut b = Backoff::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_BASE);
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let samples: Vec<u64> = (0..2000)
            .map(|_| {
                let mut b = Backoff::default();
                for _ in 0..6 {
                    b.next_delay(&mut rng);
                }
                b.next_delay(&mut rng).as_millis() as u64
            })
            .collect();
        let max = *samples.iter().max().unwrap();
        let min = *samples.iter().min().unwrap();
        let mean = samples.iter().sum::<u64>() / samples.len() as u64;
        assert!(max <= 60_000 && max > 55_000, "max {max}");
        assert!(min < 5_000, "min {min}");
        assert!((25_000..35_000).contains(&mean), "mean {mean}");
    }
}
