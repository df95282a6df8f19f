//! When host mode takes each process's object census, so that memtrace's
//! own CPU stays within [`SHARE`] of one core at host mode's default
//! interval however many processes it watches: a token bucket of census
//! time, filled by [`PER_REPORT`] (SHARE of the default interval) at every
//! report and spent by each census as it takes. A shorter `--interval` asks
//! for reports more often, and gets censuses in proportion. Every process's
//! memory is still read at every report (a read of smaps_rollup costs
//! microseconds); only the walks of the GC's lists and pymalloc's pools
//! wait their turn, the process censused longest ago first, so a large
//! process is censused less often rather than the small ones not at all.
//! Reports say when each census was taken.

use std::time::Duration;

/// The share of one core host mode's censuses may take, on average, at
/// its default interval.
pub const SHARE: f64 = 0.01;
/// Host mode's default interval between reports.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The census time each report earns.
pub const PER_REPORT: Duration = Duration::from_millis((SHARE * 10_000.0) as u64);
/// The most census time saved up, so that quiet reports are not followed
/// by a burst.
const MAX_CREDIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct CensusBudget {
    credit: Duration,
    /// What is owed: a census that took longer than the credit it had.
    debt: Duration,
}

impl CensusBudget {
    /// A report is due: adds what it earns.
    pub fn fill(&mut self) {
        let paid = PER_REPORT.min(self.debt);
        self.debt -= paid;
        self.credit = (self.credit + PER_REPORT - paid).min(MAX_CREDIT);
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
        assert_eq!(PER_REPORT, DEFAULT_INTERVAL.mul_f64(SHARE));
        let mut budget = CensusBudget::default();
        // Fifty processes whose census takes 5 ms each: 250 ms of work per
        // report, where 1% of 10 s is 100 ms.
        let mut taken = 0u32;
        for _ in 0..100 {
            budget.fill();
            for _ in 0..50 {
                if !budget.allows() {
                    break;
                }
                budget.spend(Duration::from_millis(5));
                taken += 1;
            }
        }
        // 100 reports of 100 ms, at 5 ms a census.
        assert_eq!(taken, 2000);
    }

    #[test]
    fn a_census_longer_than_the_credit_is_paid_back_first() {
        let mut budget = CensusBudget::default();
        assert!(!budget.allows(), "nothing earned yet");
        budget.fill();
        assert!(budget.allows());
        // A large process: 500 ms, five reports' worth.
        budget.spend(Duration::from_millis(500));
        for report in 2..=5 {
            budget.fill();
            assert!(!budget.allows(), "report {report}");
        }
        budget.fill();
        assert!(budget.allows());
    }
}
