//! When host mode takes each process's object census, so that memtrace's
//! own CPU stays within [`SHARE`] of one core however many processes it
//! watches: a token bucket of census time, filled at `SHARE` of the wall
//! clock and spent by each census as it takes. Every process's memory is
//! still read at every report (a read of smaps_rollup costs microseconds);
//! only the walks of the GC's lists and pymalloc's pools wait their turn,
//! the process censused longest ago first, so a large process is censused
//! less often rather than the small ones not at all. Reports say when each
//! census was taken.

use std::time::{Duration, Instant};

/// The share of one core host mode's censuses may take, on average.
pub const SHARE: f64 = 0.01;
/// The most census time saved up while idle, so that a quiet spell is not
/// followed by a burst.
const MAX_CREDIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct CensusBudget {
    credit: Duration,
    /// What is owed: a census that took longer than the credit it had.
    debt: Duration,
    filled: Instant,
}

impl Default for CensusBudget {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl CensusBudget {
    pub fn new(now: Instant) -> Self {
        // The first report censuses what it can afford of one interval's
        // worth; the rest follow at the next ones.
        Self { credit: Duration::ZERO, debt: Duration::ZERO, filled: now }
    }

    /// Adds what the time since the last fill earned.
    pub fn fill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.filled).mul_f64(SHARE);
        self.filled = now;
        let paid = earned.min(self.debt);
        self.debt -= paid;
        self.credit = (self.credit + earned - paid).min(MAX_CREDIT);
    }

    /// Whether a census may be taken now.
    pub fn allows(&self) -> bool {
        self.debt.is_zero() && !self.credit.is_zero()
    }

    /// A census took `took`.
    pub fn spend(&mut self, took: Duration) {
        match self.credit.checked_sub(took) {
            Some(left) => self.credit = left,
            None => {
                self.debt += took - self.credit;
                self.credit = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn censuses_average_the_share_of_a_core() {
        let start = Instant::now();
        let mut budget = CensusBudget::new(start);
        let interval = Duration::from_secs(10);
        // Fifty processes whose census takes 5 ms each: 250 ms of work per
        // interval, where 1% of 10 s is 100 ms.
        let mut taken = 0u32;
        for tick in 1..=100u32 {
            budget.fill(start + interval * tick);
            for _ in 0..50 {
                if !budget.allows() {
                    break;
                }
                budget.spend(Duration::from_millis(5));
                taken += 1;
            }
        }
        // 100 intervals of 100 ms, at 5 ms a census.
        assert!((1990..=2001).contains(&taken), "{taken}");
    }

    #[test]
    fn a_census_longer_than_the_credit_is_paid_back_first() {
        let start = Instant::now();
        let mut budget = CensusBudget::new(start);
        budget.fill(start + Duration::from_secs(10));
        assert!(budget.allows());
        // A large process: 500 ms, five intervals' worth.
        budget.spend(Duration::from_millis(500));
        for tick in 2..=5 {
            budget.fill(start + Duration::from_secs(10 * tick));
            assert!(!budget.allows(), "tick {tick}");
        }
        budget.fill(start + Duration::from_secs(60));
        assert!(budget.allows());
    }
}
