//! Changing a network device's rate limiters while the guest runs (Firecracker's `PATCH
//! /network-interfaces/{id}`).
//!
//! [`NetControl`] is a handle the VMM takes from a [`Net`](super::Net) before handing the
//! device to its transport. The limiters live in a slot shared by the device, its worker and
//! the handles: [`Net::new`](super::Net::new) creates them there, a worker takes them when
//! it starts and gives them back when it stops, so their tokens last across a guest reset
//! and no descriptor is created on a device thread. A change creates what it needs (a new
//! limiter's timerfd) on the caller's thread, then:
//!
//! - while no worker holds the limiters (before the first activation, after a reset) the
//!   caller makes it directly in the slot, and the next activation runs with it;
//! - while a worker runs, the change waits in the slot's mailbox and the command eventfd
//!   (one of the worker's sources) tells the worker, which makes it between frames, moves
//!   its epoll set from the old timers to the new ones, and answers; the caller waits for
//!   the answer at most [`CONTROL_TIMEOUT`] (or what [`NetControl::with_timeout`] says). A
//!   change the worker has not taken by then is withdrawn and the call fails with
//!   [`NetError::Timeout`]: a change is made completely or not at all.
//!
//! A limiter that held a frame back is unblocked by the change (its timer disarmed) and the
//! worker retries at once, under the new buckets, both the frame waiting for the guest and
//! the chains left on the transmit ring: removing a limit lets them go right away rather
//! than when the old timer would have fired.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::NetError;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
pub use crate::virtio::block::CONTROL_TIMEOUT;

/// The receive and transmit limiters of a device (`None`: that direction is not limited).
#[derive(Debug, Default)]
pub(crate) struct Limiters {
    /// Limits what the guest receives.
    pub(crate) rx: Option<RateLimiter>,
    /// Limits what the guest sends.
    pub(crate) tx: Option<RateLimiter>,
}

impl Limiters {
    /// Limiters as `rx` and `tx` describe them (each timer created on the calling thread);
    /// a configuration that limits nothing gets no limiter.
    pub(crate) fn new(
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<Self, RateLimiterError> {
        Ok(Self {
            rx: limiter_for(rx)?,
            tx: limiter_for(tx)?,
        })
    }

    /// What is in force now, as [`NetControl::rate_limiters`] reports it.
    fn configs(&self) -> (Option<RateLimiterConfig>, Option<RateLimiterConfig>) {
        (config_of(self.rx.as_ref()), config_of(self.tx.as_ref()))
    }

    /// The timers a worker waits on.
    pub(crate) fn fds(&self) -> (Option<RawFd>, Option<RawFd>) {
        (
            self.rx.as_ref().map(AsRawFd::as_raw_fd),
            self.tx.as_ref().map(AsRawFd::as_raw_fd),
        )
    }
}

/// A limiter for `config`, or none when it limits nothing.
fn limiter_for(
    config: Option<&RateLimiterConfig>,
) -> Result<Option<RateLimiter>, RateLimiterError> {
    match config {
        Some(c) if !c.is_unlimited() => RateLimiter::new(c).map(Some),
        _ => Ok(None),
    }
}

/// The buckets of `limiter`; `None` when nothing is limited.
fn config_of(limiter: Option<&RateLimiter>) -> Option<RateLimiterConfig> {
    limiter
        .map(RateLimiter::config)
        .filter(|c| !c.is_unlimited())
}

/// An update of one direction's limiter, with what it needs already created.
struct Change {
    /// The buckets to replace or remove.
    update: RateLimiterConfig,
    /// A limiter made from `update`, for a direction that has none yet.
    fresh: Option<RateLimiter>,
}

impl Change {
    /// The change `update` asks for, its limiter created here (on the caller's thread).
    fn new(update: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Ok(Self {
            update,
            fresh: limiter_for(Some(&update))?,
        })
    }

    /// Makes the change on `slot`, with Firecracker's semantics (see
    /// [`RateLimiter::update_buckets`]); what it replaced goes to `retired`.
    fn apply(self, slot: &mut Option<RateLimiter>, retired: &mut Vec<RateLimiter>) {
        RateLimiter::apply_update(slot, &self.update, self.fresh, retired);
    }
}

/// A change of the receive limiter, the transmit limiter, or both.
struct Command {
    rx: Option<Change>,
    tx: Option<Change>,
}

/// Where the limiters wait while no worker holds them, and the mailbox for a change that a
/// running worker is to make.
#[derive(Default)]
struct Slot {
    /// The limiters: here while no worker runs.
    limiters: Option<Limiters>,
    /// A change waiting for the worker.
    command: Option<Command>,
    /// Whether the worker made the change in `command`.
    answered: bool,
}

/// What a [`Net`](super::Net), its worker and its [`NetControl`]s share.
pub(crate) struct Shared {
    /// The backend, for messages ("tap NAME").
    device: String,
    slot: Mutex<Slot>,
    /// Signalled when a worker answers a change or gives the limiters back.
    changed: Condvar,
    /// Readable when a change waits in the mailbox; a running worker polls it.
    command_evt: EventFd,
    /// One control call at a time.
    control: Mutex<()>,
    /// The buckets in force now, receive then transmit.
    live: Mutex<(Option<RateLimiterConfig>, Option<RateLimiterConfig>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks but a bug; the values stay consistent (every
    // change under them is a few assignments), so a poisoned lock is still used.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a worker did with the mailbox's change.
pub(crate) struct Taken {
    /// The timers before the change (receive, transmit).
    pub(crate) before: (Option<RawFd>, Option<RawFd>),
    /// The timers after it.
    pub(crate) after: (Option<RawFd>, Option<RawFd>),
    /// The limiters the change replaced or made useless: dropped (their timers closed) once
    /// the worker no longer waits on them.
    pub(crate) retired: Vec<RateLimiter>,
}

impl Shared {
    /// The shared part of the device over `device` (its description), with `limiters`.
    pub(crate) fn new(device: String, limiters: Limiters) -> std::io::Result<Self> {
        let live = limiters.configs();
        Ok(Self {
            device,
            slot: Mutex::new(Slot {
                limiters: Some(limiters),
                ..Slot::default()
            }),
            changed: Condvar::new(),
            command_evt: EventFd::new(EFD_NONBLOCK)?,
            control: Mutex::new(()),
            live: Mutex::new(live),
        })
    }

    /// The limiters, taken out of the slot for a worker; `None` if a previous worker never
    /// gave them back. If a change waits (its worker stopped before taking it), the command
    /// eventfd is written again so that the new worker takes it.
    pub(crate) fn take_limiters(&self) -> Option<Limiters> {
        let mut slot = lock(&self.slot);
        if slot.command.is_some() {
            let _ = self.command_evt.write(1);
        }
        slot.limiters.take()
    }

    /// A stopping worker gives the limiters back; a control call waiting on it then makes
    /// its change itself.
    pub(crate) fn give_back(&self, limiters: Limiters) {
        lock(&self.slot).limiters = Some(limiters);
        self.changed.notify_all();
    }

    /// The descriptor that tells a running worker a change waits.
    pub(crate) fn command_fd(&self) -> RawFd {
        self.command_evt.as_raw_fd()
    }

    /// Consumes the command eventfd's count (the worker, before it looks at the mailbox).
    pub(crate) fn clear_command_event(&self) {
        let _ = self.command_evt.read();
    }

    /// The buckets in force now (receive, transmit); `None` where nothing is limited.
    pub(crate) fn rate_limiters(&self) -> (Option<RateLimiterConfig>, Option<RateLimiterConfig>) {
        *lock(&self.live)
    }

    /// Makes `cmd` on `limiters` (held by the worker, or in the slot while none runs);
    /// returns what it replaced.
    fn apply(&self, limiters: &mut Limiters, cmd: Command) -> Vec<RateLimiter> {
        let mut retired = Vec::new();
        if let Some(change) = cmd.rx {
            change.apply(&mut limiters.rx, &mut retired);
        }
        if let Some(change) = cmd.tx {
            change.apply(&mut limiters.tx, &mut retired);
        }
        let live = limiters.configs();
        log::info!(
            "virtio-net ({}): rate limiters now rx {:?}, tx {:?}",
            self.device,
            live.0,
            live.1
        );
        *lock(&self.live) = live;
        retired
    }

    /// The worker's side: makes the change waiting in the mailbox, if any, on `limiters`
    /// and answers the caller, in one step under the slot's lock (so a caller that timed out
    /// knows the change was not made).
    pub(crate) fn take_command(&self, limiters: &mut Limiters) -> Option<Taken> {
        let mut slot = lock(&self.slot);
        let cmd = slot.command.take()?;
        let before = limiters.fds();
        let retired = self.apply(limiters, cmd);
        let after = limiters.fds();
        slot.answered = true;
        drop(slot);
        self.changed.notify_all();
        Some(Taken {
            before,
            after,
            retired,
        })
    }
}

/// A handle that changes a [`Net`](super::Net)'s rate limiters while the guest runs:
/// cloneable, usable from any thread, valid for as long as the device exists (and harmless
/// after). Calls are serialized; each waits at most its timeout for a running device thread.
#[derive(Clone)]
pub struct NetControl {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for NetControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetControl")
            .field("device", &self.shared.device)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl NetControl {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            timeout: CONTROL_TIMEOUT,
        }
    }

    /// The same handle, waiting at most `timeout` for the device thread (instead of
    /// [`CONTROL_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The buckets in force now, receive then transmit (enabled buckets only); `None` for a
    /// direction that is not limited.
    pub fn rate_limiters(&self) -> (Option<RateLimiterConfig>, Option<RateLimiterConfig>) {
        self.shared.rate_limiters()
    }

    /// Updates the receive limiter with `rx` and the transmit limiter with `tx`, with
    /// Firecracker's semantics (those of a `PATCH /network-interfaces/{id}` body's
    /// `rx_rate_limiter` and `tx_rate_limiter`):
    ///
    /// - `None` leaves that limiter as it is;
    /// - in `Some(update)`, an absent bucket (`None`) is kept as it is, tokens included; a
    ///   present bucket replaces the old one with a new, full bucket; a present bucket with
    ///   `size` 0 or `refill_time` 0 removes that limit. So `{"bandwidth": {"size": 0,
    ///   "refill_time": 0}, "ops": {"size": 0, "refill_time": 0}}` removes all limiting of
    ///   that direction, and `{}` changes nothing.
    ///
    /// A direction without a limiter gets one made from the update (its timer created on the
    /// calling thread); a limiter left with no bucket is dropped. A frame a limiter held back
    /// is retried at once under the new buckets (Firecracker lets it wait out the old timer).
    /// Both directions change together, by the device thread between frames, or at once
    /// while none runs (the next activation then uses them).
    ///
    /// Errors name the device: a new limiter's timer cannot be created, or the device thread
    /// did not take the change within the timeout. On any error nothing was changed.
    pub fn update_rate_limiters(
        &self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> Result<(), NetError> {
        if rx.is_none() && tx.is_none() {
            return Ok(());
        }
        let _one = lock(&self.shared.control);
        let change = |update: Option<RateLimiterConfig>| {
            update
                .map(Change::new)
                .transpose()
                .map_err(|source| NetError::RateLimiter {
                    device: self.shared.device.clone(),
                    source,
                })
        };
        let cmd = Command {
            rx: change(rx)?,
            tx: change(tx)?,
        };
        self.install(cmd)
    }

    /// Makes `cmd`: directly while no worker holds the limiters, else through the worker.
    fn install(&self, cmd: Command) -> Result<(), NetError> {
        let shared = &self.shared;
        let mut slot = lock(&shared.slot);
        if let Some(limiters) = slot.limiters.as_mut() {
            let retired = shared.apply(limiters, cmd);
            drop(slot);
            drop(retired);
            return Ok(());
        }
        slot.answered = false;
        slot.command = Some(cmd);
        if let Err(source) = shared.command_evt.write(1) {
            slot.command = None;
            return Err(NetError::Io {
                device: shared.device.clone(),
                what: "cannot signal the device thread",
                source,
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if slot.answered {
                slot.answered = false;
                return Ok(());
            }
            if slot.limiters.is_some() {
                // The worker stopped (a reset, or it failed) before it took the change: the
                // limiters are back, so make it here.
                let Slot {
                    limiters, command, ..
                } = &mut *slot;
                if let (Some(limiters), Some(cmd)) = (limiters.as_mut(), command.take()) {
                    let retired = shared.apply(limiters, cmd);
                    drop(slot);
                    drop(retired);
                    return Ok(());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let withdrawn = slot.command.take();
                drop(slot);
                drop(withdrawn);
                return Err(NetError::Timeout {
                    device: shared.device.clone(),
                    timeout: self.timeout,
                });
            }
            slot = shared
                .changed
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
