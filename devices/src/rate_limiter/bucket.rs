//! The arithmetic of one enabled token bucket: refilling from elapsed time, taking tokens,
//! giving them back and computing how long a refused request must wait. No timer, no clock:
//! every operation is given the current time, so this is plain integer math.
//!
//! Refill is exact: `elapsed_ns * size` token-nanoseconds are added per update and divided by
//! the refill time in nanoseconds; the remainder is kept (`frac`) for the next update, so
//! however often the bucket is updated it never gains or loses a token to rounding.

use std::time::Duration;

use super::TokenBucket;

const NANOS_PER_MILLI: u128 = 1_000_000;

/// One enabled bucket (size and refill time both non-zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bucket {
    /// Capacity of the refilling budget.
    size: u64,
    /// The configured refill time, kept to report the configuration back.
    refill_time_ms: u64,
    /// `refill_time_ms` in nanoseconds; never zero.
    refill_ns: u128,
    /// The one-time burst as configured.
    initial_burst: u64,
    /// What is left of the one-time burst; never refills.
    burst: u64,
    /// Tokens in the refilling budget: at most `size`, negative while an oversize request is
    /// being paid back (never below `-u64::MAX`).
    budget: i128,
    /// Token-nanoseconds accumulated towards the next whole token; `< refill_ns`, and zero
    /// whenever the budget is full.
    frac: u128,
    /// The clock reading of the last refill.
    last_update: Duration,
}

impl Bucket {
    /// A full bucket as `config` describes it, or `None` when `config` disables the bucket
    /// (size or refill time zero).
    pub(super) fn new(config: &TokenBucket, now: Duration) -> Option<Self> {
        if config.is_disabled() {
            return None;
        }
        let burst = config.one_time_burst.unwrap_or(0);
        Some(Self {
            size: config.size,
            refill_time_ms: config.refill_time_ms,
            refill_ns: u128::from(config.refill_time_ms) * NANOS_PER_MILLI,
            initial_burst: burst,
            burst,
            budget: i128::from(config.size),
            frac: 0,
            last_update: now,
        })
    }

    /// The configuration this bucket was made from.
    pub(super) fn config(&self) -> TokenBucket {
        TokenBucket {
            size: self.size,
            one_time_burst: (self.initial_burst != 0).then_some(self.initial_burst),
            refill_time_ms: self.refill_time_ms,
        }
    }

    /// Adds the tokens earned between the last update and `now`.
    fn refill(&mut self, now: Duration) {
        let Some(elapsed) = now.checked_sub(self.last_update) else {
            // The clock went backwards: count no time, keep the later reading.
            return;
        };
        self.last_update = now;
        let size = i128::from(self.size);
        if self.budget >= size {
            self.frac = 0;
            return;
        }
        // Beyond 2^64 ns (584 years) elapsed time is clamped, which keeps the product in u128.
        let elapsed_ns = elapsed.as_nanos().min(u128::from(u64::MAX));
        let product = elapsed_ns * u128::from(self.size);
        // Divide the product and the carried remainder separately: their sum could overflow.
        let carry = product % self.refill_ns + self.frac;
        let tokens = product / self.refill_ns + carry / self.refill_ns;
        self.frac = carry % self.refill_ns;
        // tokens < 2^128 / 10^6 < 2^108, so it fits an i128 with room for the budget.
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX / 2);
        self.budget = self.budget.saturating_add(tokens);
        if self.budget >= size {
            self.budget = size;
            self.frac = 0;
        }
    }

    /// Tokens that can be taken now without going into debt.
    pub(super) fn available(&mut self, now: Duration) -> u64 {
        self.refill(now);
        let budget = u64::try_from(self.budget.max(0)).unwrap_or(u64::MAX);
        self.burst.saturating_add(budget)
    }

    /// Takes `tokens` (the one-time burst first), or leaves the bucket as it is and returns
    /// how long from `now` until the request can be granted.
    ///
    /// A request the budget can never hold (more than `size` beyond what is left of the burst)
    /// is granted when the budget is full: it empties the burst and the budget and leaves the
    /// excess as debt that later refills pay back before any other request is granted.
    pub(super) fn reduce(&mut self, tokens: u64, now: Duration) -> Result<(), Duration> {
        self.refill(now);
        let size = i128::from(self.size);
        let tokens = i128::from(tokens);
        let burst = i128::from(self.burst);
        let from_burst = tokens.min(burst);
        let from_budget = tokens - from_burst;
        if from_budget <= self.budget.max(0) || (from_budget > size && self.budget == size) {
            // from_burst <= burst, so this fits u64.
            self.burst -= u64::try_from(from_burst).unwrap_or(0);
            self.budget -= from_budget;
            return Ok(());
        }
        let target = from_budget.min(size);
        let deficit = u128::try_from(target - self.budget).unwrap_or(0);
        Err(self.time_to_earn(deficit, now))
    }

    /// Gives back `tokens`: debt first, then the budget up to `size`; what the full budget
    /// cannot hold returns to the one-time burst, never above its configured value.
    pub(super) fn replenish(&mut self, tokens: u64, now: Duration) {
        self.refill(now);
        let size = i128::from(self.size);
        self.budget = self.budget.saturating_add(i128::from(tokens));
        if self.budget >= size {
            let excess = u64::try_from(self.budget - size).unwrap_or(u64::MAX);
            self.budget = size;
            self.frac = 0;
            self.burst = self.burst.saturating_add(excess).min(self.initial_burst);
        }
    }

    /// How long from `now` until the refills add `deficit` tokens to the budget, rounded up to
    /// the nanosecond, saturating at `u64::MAX` nanoseconds.
    fn time_to_earn(&self, deficit: u128, now: Duration) -> Duration {
        // Smallest n with n * size + frac >= deficit * refill_ns.
        let nanos = deficit
            .checked_mul(self.refill_ns)
            .map(|needed| needed.saturating_sub(self.frac))
            .map(|needed| needed.div_ceil(u128::from(self.size)))
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(u64::MAX);
        // If the clock went backwards, the refills start at last_update, not now.
        let ahead = self.last_update.saturating_sub(now);
        Duration::from_nanos(nanos).saturating_add(ahead)
    }

    #[cfg(test)]
    pub(super) fn burst(&self) -> u64 {
        self.burst
    }

    #[cfg(test)]
    pub(super) fn budget(&self) -> i128 {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn bucket(size: u64, burst: Option<u64>, refill_time_ms: u64) -> Bucket {
        Bucket::new(
            &TokenBucket {
                size,
                one_time_burst: burst,
                refill_time_ms,
            },
            Duration::ZERO,
        )
        .unwrap()
    }

    #[test]
    fn zero_size_or_refill_time_is_no_bucket() {
        for (size, refill) in [(0, 100), (100, 0), (0, 0)] {
            let config = TokenBucket {
                size,
                one_time_burst: Some(1000),
                refill_time_ms: refill,
            };
            assert!(Bucket::new(&config, Duration::ZERO).is_none());
        }
    }

    #[test]
    fn starts_full_and_empties() {
        let mut b = bucket(1000, None, 1000);
        assert_eq!(b.available(Duration::ZERO), 1000);
        assert_eq!(b.reduce(600, Duration::ZERO), Ok(()));
        assert_eq!(b.reduce(400, Duration::ZERO), Ok(()));
        assert_eq!(b.available(Duration::ZERO), 0);
        // One token takes refill_time / size = 1 ms.
        assert_eq!(b.reduce(1, Duration::ZERO), Err(ms(1)));
        assert_eq!(b.available(Duration::ZERO), 0);
    }

    #[test]
    fn refill_is_exact_however_often_it_is_updated() {
        // 3 tokens per 1000 ms: one token every 333.33 ms.
        let mut b = bucket(3, None, 1000);
        assert_eq!(b.reduce(3, Duration::ZERO), Ok(()));
        let mut now = Duration::ZERO;
        // 999 updates of 1 ms each: 2.997 tokens, so 2 whole tokens.
        for _ in 0..999 {
            now += ms(1);
            b.available(now);
        }
        assert_eq!(b.available(now), 2);
        now += ms(1);
        assert_eq!(b.available(now), 3);
        // Full: time spent full earns nothing more.
        now += ms(10_000);
        assert_eq!(b.available(now), 3);
    }

    #[test]
    fn wait_accounts_for_the_partial_token() {
        let mut b = bucket(3, None, 1000);
        assert_eq!(b.reduce(3, Duration::ZERO), Ok(()));
        // After 100 ms, 0.3 tokens are earned; one token needs 1000/3 ms in total.
        let now = ms(100);
        let wait = b.reduce(1, now).unwrap_err();
        assert_eq!(wait, Duration::from_nanos(333_333_334) - ms(100));
        assert_eq!(b.reduce(1, now + wait), Ok(()));
    }

    #[test]
    fn burst_first_and_never_refilled() {
        let mut b = bucket(100, Some(50), 1000);
        assert_eq!(b.available(Duration::ZERO), 150);
        assert_eq!(b.reduce(30, Duration::ZERO), Ok(()));
        assert_eq!((b.burst(), b.budget()), (20, 100));
        // Straddles the burst and the budget.
        assert_eq!(b.reduce(40, Duration::ZERO), Ok(()));
        assert_eq!((b.burst(), b.budget()), (0, 80));
        assert_eq!(b.available(ms(1_000_000)), 100);
        assert_eq!(b.burst(), 0);
    }

    #[test]
    fn refused_request_takes_nothing() {
        let mut b = bucket(100, Some(50), 1000);
        assert_eq!(b.reduce(100, Duration::ZERO), Ok(()));
        assert_eq!((b.burst(), b.budget()), (0, 50));
        assert!(b.reduce(60, Duration::ZERO).is_err());
        assert_eq!((b.burst(), b.budget()), (0, 50));
    }

    #[test]
    fn oversize_request_waits_for_a_full_bucket_then_goes_into_debt() {
        let mut b = bucket(100, None, 1000);
        assert_eq!(b.reduce(10, Duration::ZERO), Ok(()));
        // 250 > size: needs a full budget, 10 tokens away (100 ms).
        assert_eq!(b.reduce(250, Duration::ZERO), Err(ms(100)));
        assert_eq!(b.reduce(250, ms(100)), Ok(()));
        assert_eq!(b.budget(), -150);
        assert_eq!(b.available(ms(100)), 0);
        // The debt is paid back before even one token is granted: 151 tokens = 1510 ms.
        assert_eq!(b.reduce(1, ms(100)), Err(ms(1510)));
        // Another oversize request needs the budget full again: 250 tokens = 2500 ms.
        assert_eq!(b.reduce(250, ms(100)), Err(ms(2500)));
        assert_eq!(b.reduce(250, ms(2600)), Ok(()));
    }

    #[test]
    fn oversize_request_uses_the_burst_first() {
        let mut b = bucket(100, Some(100), 1000);
        // 150 fits burst + budget.
        assert_eq!(b.reduce(150, Duration::ZERO), Ok(()));
        assert_eq!((b.burst(), b.budget()), (0, 50));
        let mut b = bucket(100, Some(100), 1000);
        // 300: 100 from the burst, 200 from a full budget, 100 of debt.
        assert_eq!(b.reduce(300, Duration::ZERO), Ok(()));
        assert_eq!((b.burst(), b.budget()), (0, -100));
    }

    #[test]
    fn replenish_pays_debt_then_budget_then_burst() {
        let mut b = bucket(100, Some(40), 1000);
        assert_eq!(b.reduce(340, Duration::ZERO), Ok(()));
        assert_eq!((b.burst(), b.budget()), (0, -200));
        b.replenish(250, Duration::ZERO);
        assert_eq!((b.burst(), b.budget()), (0, 50));
        b.replenish(80, Duration::ZERO);
        assert_eq!((b.burst(), b.budget()), (30, 100));
        // Never above the configured burst.
        b.replenish(u64::MAX, Duration::ZERO);
        assert_eq!((b.burst(), b.budget()), (40, 100));
    }

    #[test]
    fn extreme_values_neither_overflow_nor_panic() {
        let mut b = bucket(u64::MAX, Some(u64::MAX), u64::MAX);
        assert_eq!(b.available(Duration::ZERO), u64::MAX);
        assert_eq!(b.reduce(u64::MAX, Duration::ZERO), Ok(()));
        assert_eq!(b.reduce(u64::MAX, Duration::ZERO), Ok(()));
        assert_eq!(b.budget(), 0);
        // One token takes u64::MAX ms / u64::MAX = 1 ms.
        assert_eq!(b.reduce(1, Duration::ZERO), Err(ms(1)));
        assert_eq!(
            b.reduce(u64::MAX, Duration::ZERO),
            Err(Duration::from_nanos(u64::MAX))
        );
        b.available(Duration::MAX);
        assert_eq!(b.available(Duration::MAX), u64::MAX / 1_000_000);

        let mut b = bucket(1, None, u64::MAX);
        assert_eq!(b.reduce(u64::MAX, Duration::ZERO), Ok(()));
        assert_eq!(b.budget(), 1 - i128::from(u64::MAX));
        assert_eq!(
            b.reduce(1, Duration::ZERO),
            Err(Duration::from_nanos(u64::MAX))
        );
        b.available(Duration::MAX);
        b.replenish(u64::MAX, Duration::MAX);
        assert_eq!(b.available(Duration::MAX), 1);
    }

    #[test]
    fn clock_going_backwards_counts_no_time() {
        let mut b = bucket(1000, None, 1000);
        assert_eq!(b.reduce(1000, ms(500)), Ok(()));
        assert_eq!(b.available(ms(100)), 0);
        assert_eq!(b.reduce(1, ms(100)), Err(ms(401)));
        assert_eq!(b.available(ms(501)), 1);
    }
}
