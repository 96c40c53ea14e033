//! Token-bucket rate limiting for virtio devices (block: bytes and operations; rng: bytes;
//! net: one limiter for rx and one for tx), with Firecracker's configuration and semantics.
//!
//! A [`RateLimiter`] has up to two independent buckets, one counting bytes and one counting
//! operations. A bucket holds up to `size` tokens, starts full and refills continuously at
//! `size` tokens per `refill_time` milliseconds; its optional one-time burst is an extra pool,
//! spent before the refilling budget and never refilled. A bucket whose `size` or
//! `refill_time` is 0 does not exist: that kind of token is unlimited (Firecracker does the
//! same and accepts such a configuration).
//!
//! A device asks [`RateLimiter::consume`] before each request. When the tokens are not there
//! the request is refused and the limiter is *blocked*: its timerfd ([`RateLimiter::as_raw_fd`],
//! for the device thread's epoll) is armed for the moment the refused request would fit, every
//! `consume` is refused until the device calls [`RateLimiter::event_handler`] on that timer's
//! event, and the device then retries the request it held back.
//!
//! A request larger than the bucket can ever hold (more than `size` beyond what is left of the
//! one-time burst) is granted once the budget is full: it empties the bucket and leaves the
//! excess as debt, which the refills pay back before anything else is granted. So such a
//! request never deadlocks, waits at most one `refill_time`, and the long-run rate stays
//! `size / refill_time`: after any time `t`, at most `one_time_burst + size + rate * t` tokens
//! plus the excess of one oversize request have been granted.
//!
//! What does not live here: the devices' queues and the API that configures a limiter.

mod bucket;
mod clock;

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;
use vmm_sys_util::timerfd::TimerFd;

use bucket::Bucket;
pub use clock::{Clock, ManualClock, MonotonicClock};

/// The shortest time the limiter's timer is armed for. Refill times are whole milliseconds, so a
/// bucket always holds at least a millisecond's worth of refill and sleeping 1 ms never wastes
/// tokens; shorter waits would only wake the device thread more often for a token or two.
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// One token bucket's configuration (Firecracker's `TokenBucket` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// The number of tokens the bucket holds when full; 0 disables the bucket.
    pub size: u64,
    /// Tokens available once, on top of `size`, spent first and never refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds it takes an empty bucket to refill completely; 0 disables the bucket.
    #[serde(rename = "refill_time")]
    pub refill_time_ms: u64,
}

impl TokenBucket {
    /// True when this configuration means "no limit": a size or refill time of 0.
    pub fn is_disabled(&self) -> bool {
        self.size == 0 || self.refill_time_ms == 0
    }
}

/// A rate limiter's configuration (Firecracker's `RateLimiter` object). An absent bucket is
/// no limit on that kind of token; when updating a limiter, it leaves that bucket as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// The bucket counting bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// The bucket counting operations (requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiterConfig {
    /// True when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none_or(|b| b.is_disabled()) && self.ops.is_none_or(|b| b.is_disabled())
    }
}

/// Which bucket a [`RateLimiter`] operation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes: the `bandwidth` bucket.
    Bytes,
    /// Operations: the `ops` bucket.
    Ops,
}

/// What can go wrong with a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The timerfd could not be created.
    #[error("cannot create the rate limiter's timerfd")]
    CreateTimer(#[source] errno::Error),
    /// The timerfd could not be queried or read.
    #[error("cannot read the rate limiter's timerfd")]
    ReadTimer(#[source] errno::Error),
    /// [`RateLimiter::event_handler`] was called while the limiter was not blocked or before
    /// its timer expired.
    #[error("rate limiter event while not blocked or before its timer expired")]
    SpuriousEvent,
}

/// A bytes bucket and an operations bucket, each optional, with the timer that wakes the
/// device once a refused request would fit. See the module documentation for the semantics.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    blocked: bool,
    throttled: u64,
    /// How long the timer was last armed for (what the tests check).
    armed_for: Option<Duration>,
    clock: Box<dyn Clock>,
}

impl RateLimiter {
    /// A limiter as `config` describes it, on the host's monotonic clock; both buckets start
    /// full.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Self::with_clock(config, Box::new(MonotonicClock::new()))
    }

    /// A limiter that limits nothing (still with a timerfd, so a device can always register
    /// it).
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::new(&RateLimiterConfig::default())
    }

    /// A limiter reading the time from `clock` (tests use a [`ManualClock`]). The timerfd
    /// always runs on the host's monotonic clock.
    pub fn with_clock(
        config: &RateLimiterConfig,
        clock: Box<dyn Clock>,
    ) -> Result<Self, RateLimiterError> {
        let now = clock.now();
        let make = |b: &Option<TokenBucket>| b.as_ref().and_then(|b| Bucket::new(b, now));
        Ok(Self {
            bandwidth: make(&config.bandwidth),
            ops: make(&config.ops),
            timer: TimerFd::new().map_err(RateLimiterError::CreateTimer)?,
            blocked: false,
            throttled: 0,
            armed_for: None,
            clock,
        })
    }

    /// Takes `tokens` of `kind`, returning true when the request may go ahead. Returns false,
    /// taking nothing, while the limiter is blocked, or when the tokens are not there; in that
    /// case the limiter becomes blocked and its timer is armed for when they will be (at least
    /// [`MIN_WAIT`]). A kind without a bucket is never refused (unless the limiter is blocked).
    ///
    /// Should the timer fail to arm (which timerfd_settime does only for invalid arguments),
    /// the request is granted rather than left waiting for a wake-up that would never come.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            self.throttled = self.throttled.saturating_add(1);
            return false;
        }
        let now = self.clock.now();
        let Some(bucket) = self.bucket_mut(kind) else {
            return true;
        };
        let Err(wait) = bucket.reduce(tokens, now) else {
            return true;
        };
        let wait = wait.max(MIN_WAIT);
        if let Err(e) = self.timer.reset(wait, None) {
            log::error!("rate limiter: cannot arm the timer for {wait:?}, not limiting: {e}");
            return true;
        }
        self.throttled = self.throttled.saturating_add(1);
        self.blocked = true;
        self.armed_for = Some(wait);
        false
    }

    /// Admits one request of `bytes` bytes: one op, then the bytes (none taken for an empty
    /// request). When the bytes are refused, the op is given back, so a refused request costs
    /// nothing; the limiter is then blocked with its timer armed, as after a refused
    /// [`consume`](Self::consume).
    pub fn admit(&mut self, bytes: u64) -> bool {
        if !self.consume(1, TokenType::Ops) {
            return false;
        }
        if bytes > 0 && !self.consume(bytes, TokenType::Bytes) {
            self.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// Gives back `tokens` of `kind` that were consumed for a request that did not happen (for
    /// example the bytes of a block request whose operation was then refused). They pay back
    /// debt first, then fill the budget; what a full budget cannot hold returns to the one-time
    /// burst, up to its configured value.
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        let now = self.clock.now();
        if let Some(bucket) = self.bucket_mut(kind) {
            bucket.replenish(tokens, now);
        }
    }

    /// True from a refused [`consume`](Self::consume) until [`event_handler`](Self::event_handler)
    /// handles the timer's expiry.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Handles the timer's event (the fd became readable): reads the timerfd and unblocks the
    /// limiter; the device should then retry the request it held back. Never blocks: a call
    /// while the limiter is not blocked, or before the timer expired, reads nothing and returns
    /// [`RateLimiterError::SpuriousEvent`].
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        // Blocked means armed and not yet read; an armed one-shot timer reads as disarmed only
        // once it expired, so the read below returns at once.
        if !self.blocked || self.timer.is_armed().map_err(RateLimiterError::ReadTimer)? {
            return Err(RateLimiterError::SpuriousEvent);
        }
        self.blocked = false;
        self.timer.wait().map_err(RateLimiterError::ReadTimer)?;
        Ok(())
    }

    /// Applies a runtime update (PATCH of a drive or an interface), with Firecracker's
    /// semantics: an absent bucket is left as it is (its tokens too); a present one replaces
    /// the old bucket with a new, full one, or removes it when its size or refill time is 0.
    /// A pending timer is left armed, so a blocked device is still woken when it expires.
    pub fn update_buckets(&mut self, update: &RateLimiterConfig) {
        let now = self.clock.now();
        if let Some(config) = &update.bandwidth {
            self.bandwidth = Bucket::new(config, now);
        }
        if let Some(config) = &update.ops {
            self.ops = Bucket::new(config, now);
        }
    }

    /// Ends a wait early: disarms the timer and lets the next [`consume`](Self::consume) try
    /// the buckets again. A device calls it after [`update_buckets`](Self::update_buckets),
    /// so that a request held back under the old buckets is retried under the new ones at
    /// once rather than when the old wait ends; one the buckets still cannot pay blocks the
    /// limiter again, with the timer armed for the new wait. Does nothing when not blocked,
    /// or when the timer cannot be disarmed (it then still fires as armed).
    pub fn unblock(&mut self) {
        if !self.blocked {
            return;
        }
        // Disarming also resets the expiry count, so the fd is no longer readable.
        if let Err(e) = self.timer.clear() {
            log::warn!("rate limiter: cannot disarm the timer, waiting for it: {e}");
            return;
        }
        self.blocked = false;
        self.armed_for = None;
    }

    /// Applies `update` to the limiter in `slot` (Firecracker's semantics, see
    /// [`update_buckets`](Self::update_buckets)), retrying at once whatever it held back, or
    /// installs `fresh` (made from `update` on the caller's thread) when there is none. A
    /// limiter left without buckets leaves the slot. What is no longer used goes to `retired`,
    /// to be dropped once its timer is out of the caller's epoll set.
    pub fn apply_update(
        slot: &mut Option<RateLimiter>,
        update: &RateLimiterConfig,
        fresh: Option<RateLimiter>,
        retired: &mut Vec<RateLimiter>,
    ) {
        match slot.as_mut() {
            Some(l) => {
                l.update_buckets(update);
                l.unblock();
                if l.is_unlimited() && !l.is_blocked() {
                    retired.extend(slot.take());
                }
                retired.extend(fresh);
            }
            None => *slot = fresh,
        }
    }

    /// The buckets as configured now (absent when disabled).
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(Bucket::config),
            ops: self.ops.as_ref().map(Bucket::config),
        }
    }

    /// True when neither bucket exists: `consume` refuses only while blocked.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Tokens of `kind` that could be taken now (one-time burst included), or `None` when that
    /// kind is unlimited. Ignores whether the limiter is blocked.
    pub fn available(&mut self, kind: TokenType) -> Option<u64> {
        let now = self.clock.now();
        self.bucket_mut(kind).map(|b| b.available(now))
    }

    /// How many `consume` calls were refused since the limiter was created (the devices'
    /// `rate_limiter_throttled_events` metric).
    pub fn throttled_count(&self) -> u64 {
        self.throttled
    }

    fn bucket_mut(&mut self, kind: TokenType) -> Option<&mut Bucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd that becomes readable when a blocked limiter may unblock.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tb(size: u64, one_time_burst: Option<u64>, refill_time_ms: u64) -> TokenBucket {
        TokenBucket {
            size,
            one_time_burst,
            refill_time_ms,
        }
    }

    fn limiter(
        bandwidth: Option<TokenBucket>,
        ops: Option<TokenBucket>,
    ) -> (RateLimiter, ManualClock) {
        let clock = ManualClock::new();
        let rl = RateLimiter::with_clock(
            &RateLimiterConfig { bandwidth, ops },
            Box::new(clock.clone()),
        )
        .unwrap();
        (rl, clock)
    }

    /// Waits (up to 10 s, far beyond any wait these tests arm) for the timerfd to fire.
    fn wait_for_timer(rl: &RateLimiter) {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                rl.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut events = [EpollEvent::default()];
        assert_eq!(
            epoll.wait(10_000, &mut events).unwrap(),
            1,
            "timer never fired"
        );
    }

    #[test]
    fn full_bucket_is_consumed_then_refused() {
        let (mut rl, _clock) = limiter(Some(tb(1000, None, 1000)), None);
        assert!(!rl.is_blocked());
        assert_eq!(rl.available(TokenType::Bytes), Some(1000));
        assert!(rl.consume(400, TokenType::Bytes));
        assert!(rl.consume(600, TokenType::Bytes));
        assert_eq!(rl.available(TokenType::Bytes), Some(0));
        assert_eq!(rl.throttled_count(), 0);
        assert!(!rl.consume(1, TokenType::Bytes));
        assert!(rl.is_blocked());
        assert_eq!(rl.throttled_count(), 1);
    }

    #[test]
    fn refills_over_time() {
        let (mut rl, clock) = limiter(Some(tb(1000, None, 1000)), None);
        assert!(rl.consume(1000, TokenType::Bytes));
        clock.advance(ms(250));
        assert_eq!(rl.available(TokenType::Bytes), Some(250));
        assert!(rl.consume(250, TokenType::Bytes));
        // Never beyond size.
        clock.advance(ms(5000));
        assert_eq!(rl.available(TokenType::Bytes), Some(1000));
    }

    #[test]
    fn one_time_burst_is_consumed_first_and_not_refilled() {
        let (mut rl, clock) = limiter(Some(tb(100, Some(1000), 1000)), None);
        assert_eq!(rl.available(TokenType::Bytes), Some(1100));
        assert!(rl.consume(1000, TokenType::Bytes));
        // The budget is untouched: the burst went first.
        assert_eq!(rl.available(TokenType::Bytes), Some(100));
        assert!(rl.consume(100, TokenType::Bytes));
        clock.advance(ms(60_000));
        assert_eq!(rl.available(TokenType::Bytes), Some(100));
        // Reported back as configured.
        assert_eq!(rl.config().bandwidth, Some(tb(100, Some(1000), 1000)));
    }

    #[test]
    fn bytes_and_ops_are_independent() {
        let (mut rl, _clock) = limiter(Some(tb(1000, None, 1000)), Some(tb(2, None, 1000)));
        assert!(rl.consume(1000, TokenType::Bytes));
        assert_eq!(rl.available(TokenType::Ops), Some(2));
        assert!(rl.consume(1, TokenType::Ops));
        assert_eq!(rl.available(TokenType::Bytes), Some(0));
        assert_eq!(rl.available(TokenType::Ops), Some(1));
    }

    #[test]
    fn refused_ops_give_back_the_bytes() {
        // The block device's pattern: bytes first, then the operation.
        let (mut rl, _clock) = limiter(Some(tb(1000, None, 1000)), Some(tb(1, None, 1000)));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(rl.consume(512, TokenType::Bytes));
        assert!(!rl.consume(1, TokenType::Ops));
        rl.manual_replenish(512, TokenType::Bytes);
        assert_eq!(rl.available(TokenType::Bytes), Some(1000));
        // Replenishing an unlimited kind is a no-op.
        let (mut rl, _clock) = limiter(None, None);
        rl.manual_replenish(512, TokenType::Bytes);
        assert_eq!(rl.available(TokenType::Bytes), None);
    }

    #[test]
    fn blocked_arms_timer_for_the_missing_tokens() {
        // 1000 tokens per second: 1 token per ms.
        let (mut rl, clock) = limiter(Some(tb(1000, None, 1000)), None);
        assert!(rl.consume(900, TokenType::Bytes));
        assert!(!rl.timer.is_armed().unwrap());
        assert!(!rl.consume(350, TokenType::Bytes));
        assert!(rl.is_blocked());
        assert!(rl.timer.is_armed().unwrap());
        assert_eq!(rl.armed_for, Some(ms(250)));
        // Everything is refused while blocked, even what would fit, and nothing is taken.
        clock.advance(ms(1000));
        assert!(!rl.consume(1, TokenType::Bytes));
        assert!(!rl.consume(1, TokenType::Ops));
        assert_eq!(rl.throttled_count(), 3);
        assert_eq!(rl.available(TokenType::Bytes), Some(1000));
    }

    #[test]
    fn short_waits_are_rounded_up_to_the_minimum() {
        // 1_000_000 tokens per second: one token needs 1 µs, armed as MIN_WAIT.
        let (mut rl, _clock) = limiter(Some(tb(1_000_000, None, 1000)), None);
        assert!(rl.consume(1_000_000, TokenType::Bytes));
        assert!(!rl.consume(1, TokenType::Bytes));
        assert_eq!(rl.armed_for, Some(MIN_WAIT));
    }

    #[test]
    fn timer_event_unblocks() {
        let (mut rl, clock) = limiter(None, Some(tb(1000, None, 1000)));
        // Not blocked: spurious, and nothing is read.
        assert!(matches!(
            rl.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(rl.consume(1000, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        assert_eq!(rl.armed_for, Some(MIN_WAIT));
        wait_for_timer(&rl);
        assert!(rl.is_blocked());
        rl.event_handler().unwrap();
        assert!(!rl.is_blocked());
        // The event was consumed: a second call is spurious and does not block.
        assert!(matches!(
            rl.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        clock.advance(MIN_WAIT);
        assert!(rl.consume(1, TokenType::Ops));
    }

    #[test]
    fn event_before_expiry_is_spurious_and_keeps_blocking() {
        let (mut rl, _clock) = limiter(Some(tb(1, None, 3_600_000)), None);
        assert!(rl.consume(1, TokenType::Bytes));
        assert!(!rl.consume(1, TokenType::Bytes));
        assert_eq!(rl.armed_for, Some(Duration::from_secs(3600)));
        assert!(matches!(
            rl.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(rl.is_blocked());
        assert!(rl.timer.is_armed().unwrap());
    }

    #[test]
    fn oversize_request_does_not_deadlock() {
        // A 64 KiB request against a 4 KiB bucket refilling every 100 ms.
        let (mut rl, clock) = limiter(Some(tb(4096, None, 100)), None);
        assert!(rl.consume(1024, TokenType::Bytes));
        // The bucket is not full: wait until it is (1024 tokens = 25 ms).
        assert!(!rl.consume(65536, TokenType::Bytes));
        assert_eq!(rl.armed_for, Some(ms(25)));
        clock.advance(ms(25));
        rl.blocked = false; // what event_handler does once the real timer fires
        assert!(rl.consume(65536, TokenType::Bytes));
        assert!(!rl.is_blocked());
        // The 61440 tokens of debt are paid back before anything else goes: 1500 ms, then one
        // more token (1/4096 of 100 ms, rounded up).
        assert!(!rl.consume(1, TokenType::Bytes));
        assert_eq!(rl.armed_for, Some(ms(1500) + Duration::from_nanos(24_415)));
        clock.advance(ms(1500));
        rl.blocked = false;
        assert_eq!(rl.available(TokenType::Bytes), Some(0));
        clock.advance(ms(100));
        assert_eq!(rl.available(TokenType::Bytes), Some(4096));
        // The long-run rate holds: 10 oversize requests in a row are granted one full refill
        // of their own size apart, i.e. at 4096 tokens per 100 ms.
        let mut granted = 0u64;
        let mut elapsed = Duration::ZERO;
        while granted < 10 {
            if rl.consume(65536, TokenType::Bytes) {
                granted += 1;
            } else {
                let wait = rl.armed_for.unwrap();
                clock.advance(wait);
                elapsed += wait;
                rl.blocked = false;
            }
        }
        assert_eq!(elapsed, 9 * ms(1600));
    }

    #[test]
    fn update_replaces_present_buckets_and_keeps_absent_ones() {
        let (mut rl, _clock) = limiter(Some(tb(1000, None, 1000)), Some(tb(10, None, 1000)));
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(rl.consume(5, TokenType::Ops));
        // Absent bandwidth: kept as it is, tokens included.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(100, Some(50), 500)),
        });
        assert_eq!(rl.available(TokenType::Bytes), Some(0));
        assert_eq!(rl.available(TokenType::Ops), Some(150));
        assert_eq!(
            rl.config(),
            RateLimiterConfig {
                bandwidth: Some(tb(1000, None, 1000)),
                ops: Some(tb(100, Some(50), 500)),
            }
        );
        // Size 0 (or refill time 0) removes the bucket.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: Some(tb(0, None, 1000)),
            ops: Some(tb(100, None, 0)),
        });
        assert!(rl.is_unlimited());
        assert_eq!(rl.config(), RateLimiterConfig::default());
        assert!(rl.consume(u64::MAX, TokenType::Bytes));
        // A new bucket on an unlimited kind starts full.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: Some(tb(64, None, 10)),
            ops: None,
        });
        assert_eq!(rl.available(TokenType::Bytes), Some(64));
        assert_eq!(rl.available(TokenType::Ops), None);
    }

    #[test]
    fn update_while_blocked_keeps_the_timer() {
        let (mut rl, _clock) = limiter(Some(tb(10, None, 3_600_000)), None);
        assert!(rl.consume(10, TokenType::Bytes));
        assert!(!rl.consume(10, TokenType::Bytes));
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: Some(tb(0, None, 0)),
            ops: None,
        });
        assert!(rl.is_blocked());
        assert!(rl.timer.is_armed().unwrap());
    }

    #[test]
    fn unblock_disarms_the_timer_and_retries_at_once() {
        let (mut rl, _clock) = limiter(None, Some(tb(1, None, 3_600_000)));
        rl.unblock(); // not blocked: nothing happens
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        assert!(rl.timer.is_armed().unwrap());
        // New buckets, then the retry goes through without waiting for the old timer.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(2, None, 3_600_000)),
        });
        rl.unblock();
        assert!(!rl.is_blocked());
        assert!(!rl.timer.is_armed().unwrap());
        assert!(matches!(
            rl.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(rl.consume(1, TokenType::Ops));
        // Buckets that still cannot pay block again, for the new wait.
        assert!(!rl.consume(1, TokenType::Ops));
        assert!(rl.is_blocked());
        assert_eq!(rl.armed_for, Some(Duration::from_secs(1800)));
        // An expired, unread timer is read away too: the fd is no longer readable.
        let (mut rl, _clock) = limiter(None, Some(tb(1, None, 1000)));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        wait_for_timer(&rl);
        rl.unblock();
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll writes only the revents of our one pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    }

    #[test]
    fn disabled_buckets_never_refuse() {
        for config in [
            RateLimiterConfig::default(),
            RateLimiterConfig {
                bandwidth: Some(tb(0, Some(100), 1000)),
                ops: Some(tb(5, Some(100), 0)),
            },
        ] {
            assert!(config.is_unlimited());
            let clock = ManualClock::new();
            let mut rl = RateLimiter::with_clock(&config, Box::new(clock)).unwrap();
            assert!(rl.is_unlimited());
            assert_eq!(rl.config(), RateLimiterConfig::default());
            for _ in 0..1000 {
                assert!(rl.consume(u64::MAX, TokenType::Bytes));
                assert!(rl.consume(u64::MAX, TokenType::Ops));
            }
            assert!(!rl.is_blocked());
            assert_eq!(rl.throttled_count(), 0);
        }
        // One disabled bucket does not disable the other.
        let (mut rl, _clock) = limiter(Some(tb(0, None, 1000)), Some(tb(1, None, 1000)));
        assert!(!rl.is_unlimited());
        assert!(rl.consume(u64::MAX, TokenType::Bytes));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
    }

    #[test]
    fn unlimited_and_real_clock_limiters_work() {
        let mut rl = RateLimiter::unlimited().unwrap();
        assert!(rl.is_unlimited());
        assert!(rl.consume(1 << 40, TokenType::Bytes));
        assert!(rl.as_raw_fd() >= 0);
        let mut rl = RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(tb(100, None, 3_600_000)),
            ops: None,
        })
        .unwrap();
        assert!(rl.consume(100, TokenType::Bytes));
        assert!(!rl.consume(100, TokenType::Bytes));
    }

    #[test]
    fn config_json_uses_firecracker_field_names() {
        let json = r#"{"bandwidth":{"size":1048576,"one_time_burst":4194304,"refill_time":1000},
                       "ops":{"size":100,"refill_time":100}}"#;
        let config: RateLimiterConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            config,
            RateLimiterConfig {
                bandwidth: Some(tb(1_048_576, Some(4_194_304), 1000)),
                ops: Some(tb(100, None, 100)),
            }
        );
        let out = serde_json::to_value(config).unwrap();
        assert_eq!(
            out,
            serde_json::json!({
                "bandwidth": {"size": 1048576, "one_time_burst": 4194304, "refill_time": 1000},
                "ops": {"size": 100, "refill_time": 100},
            })
        );
        let back: RateLimiterConfig = serde_json::from_value(out).unwrap();
        assert_eq!(back, config);
        // Empty object: no limits; explicit nulls are absent buckets too.
        let empty: RateLimiterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, RateLimiterConfig::default());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
        let nulls: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth":null,"ops":{"size":1,"refill_time":1,"one_time_burst":null}}"#,
        )
        .unwrap();
        assert_eq!(nulls.bandwidth, None);
        assert_eq!(nulls.ops, Some(tb(1, None, 1)));
    }

    #[test]
    fn config_json_rejects_unknown_missing_and_negative_fields() {
        for bad in [
            r#"{"bandwidth":{"size":1,"refill_time":1},"iops":{}}"#,
            r#"{"bandwidth":{"size":1,"refill_time":1,"refill_time_ms":1}}"#,
            r#"{"bandwidth":{"size":1,"refill_time_ms":1}}"#,
            r#"{"bandwidth":{"refill_time":1}}"#,
            r#"{"bandwidth":{"size":1}}"#,
            r#"{"bandwidth":{"size":-1,"refill_time":1}}"#,
            r#"{"ops":{"size":1,"refill_time":1,"one_time_burst":-5}}"#,
            r#"{"ops":{"size":"1","refill_time":1}}"#,
        ] {
            assert!(
                serde_json::from_str::<RateLimiterConfig>(bad).is_err(),
                "accepted {bad}"
            );
        }
    }
}
