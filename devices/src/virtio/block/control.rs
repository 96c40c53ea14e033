//! Changing a disk while the guest runs (Firecracker's `PATCH /drives/{id}`): swapping its
//! backing file, replacing its rate limiter.
//!
//! [`BlockControl`] is a handle the VMM takes from a [`Block`](super::Block) before handing
//! the device to its transport. The caller's thread does everything that opens a
//! descriptor (the new image and its overlay, the new io_uring ring, a new limiter's timer:
//! a device thread's seccomp filter forbids `open`), then the change is installed:
//!
//! - while no worker holds the disk (before the first activation, after a reset, after a
//!   worker failed) the caller installs it directly in the device's slot;
//! - while a worker runs, the change waits in the slot's mailbox and the command eventfd
//!   (one of the worker's sources) tells the worker, which installs it between requests and
//!   answers; the caller waits for the answer at most [`CONTROL_TIMEOUT`] (or what
//!   [`BlockControl::with_timeout`] says). A change the worker has not taken by then is
//!   withdrawn and the call fails with [`BlockError::Timeout`]: a change is either made
//!   completely or not at all, never left half done or pending.
//!
//! A swap replaces the disk and its executor and keeps the serial, the rate limiter and the
//! queue. The worker first lets the requests in flight on the old disk (io_uring) finish and
//! completes them as usual, starting no new ones meanwhile; then it switches, updates the
//! capacity and the configuration generation (one lock, so that a driver reading the
//! generation, the capacity and the generation again never takes a torn capacity for a
//! consistent one) and raises the configuration interrupt so the driver reads the new size.
//! Requests still in the available ring are then checked against the new disk.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::Disk;
use super::engine::Executor;
use super::{BlockConfig, BlockError, BlockState};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

/// How long a control call waits for a running device thread to take a change.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// A change for the device's state, with everything it needs already opened.
pub(crate) enum Command {
    /// A new backing file.
    Swap {
        /// The new image.
        path: PathBuf,
        /// It, opened as the device's settings say.
        disk: Disk,
        /// Its engine.
        executor: Executor,
    },
    /// A rate limiter update (Firecracker's semantics, see [`BlockControl::update_rate_limiter`]).
    Limiter {
        /// The buckets to replace or remove.
        update: RateLimiterConfig,
        /// A limiter made from `update`, for a device that has none yet.
        fresh: Option<Box<RateLimiter>>,
    },
}

impl Command {
    /// Whether the worker must finish the requests in flight on the old disk first.
    pub(crate) fn needs_quiet_disk(&self) -> bool {
        matches!(self, Command::Swap { .. })
    }
}

/// What a change replaced. Dropped (closing its descriptors, unmapping a ring) once the
/// worker no longer waits on those descriptors.
#[derive(Default)]
pub(crate) struct Retired {
    _disk: Option<Disk>,
    _executor: Option<Executor>,
    _limiters: Vec<RateLimiter>,
}

/// Where the state of a disk waits while no worker holds it, and the mailbox for a change
/// that a running worker is to make.
#[derive(Default)]
pub(crate) struct Slot {
    /// The disk, its engine and limiter: here while no worker runs.
    pub(crate) state: Option<BlockState>,
    /// A change waiting for the worker.
    command: Option<Command>,
    /// The worker's answer to it: the capacity after the change.
    answer: Option<u64>,
}

/// What the guest sees of the disk that can change at run time, and what is reported.
struct Live {
    path: PathBuf,
    capacity: u64,
    generation: u32,
    rate_limiter: Option<RateLimiterConfig>,
}

/// What a [`Block`](super::Block), its worker and its [`BlockControl`]s share.
pub(crate) struct Shared {
    /// How the device was created; `path` is the first image.
    settings: BlockConfig,
    slot: Mutex<Slot>,
    /// Signalled when a worker answers a change or gives the state back.
    changed: Condvar,
    /// Readable when a change waits in the mailbox; a running worker polls it.
    command_evt: EventFd,
    /// One control call at a time.
    control: Mutex<()>,
    live: Mutex<Live>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks but a bug; the values stay consistent (every
    // change under them is a few assignments), so a poisoned lock is still used.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The shared part of a new device whose state is `state`.
    pub(crate) fn new(settings: BlockConfig, state: BlockState) -> std::io::Result<Self> {
        let live = Live {
            path: settings.path.clone(),
            capacity: state.disk.capacity(),
            generation: 0,
            rate_limiter: state.limiter.as_ref().map(RateLimiter::config),
        };
        Ok(Self {
            settings,
            slot: Mutex::new(Slot {
                state: Some(state),
                ..Slot::default()
            }),
            changed: Condvar::new(),
            command_evt: EventFd::new(EFD_NONBLOCK)?,
            control: Mutex::new(()),
            live: Mutex::new(live),
        })
    }

    /// The slot, locked.
    pub(crate) fn lock_slot(&self) -> MutexGuard<'_, Slot> {
        lock(&self.slot)
    }

    /// The state, taken out of the slot for a worker. If a change waits (its worker
    /// stopped before taking it), the command eventfd is written again so that the new
    /// worker takes it.
    pub(crate) fn take_state(&self) -> Option<BlockState> {
        let mut slot = self.lock_slot();
        if slot.command.is_some() {
            let _ = self.command_evt.write(1);
        }
        slot.state.take()
    }

    /// A stopping worker gives the state back; a control call waiting on it then makes its
    /// change itself.
    pub(crate) fn give_back(&self, state: BlockState) {
        self.lock_slot().state = Some(state);
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

    /// How the device was created (its first image, its mode, engine and serial).
    pub(crate) fn settings(&self) -> &BlockConfig {
        &self.settings
    }

    /// The image the disk reads now.
    pub(crate) fn path(&self) -> PathBuf {
        lock(&self.live).path.clone()
    }

    /// The disk's size in sectors now.
    pub(crate) fn capacity(&self) -> u64 {
        lock(&self.live).capacity
    }

    /// The configuration space now, with its generation, read under one lock.
    pub(crate) fn config(&self) -> (u64, u32) {
        let live = lock(&self.live);
        (live.capacity, live.generation)
    }

    /// The rate limiter's buckets now; `None` when nothing is limited.
    pub(crate) fn rate_limiter(&self) -> Option<RateLimiterConfig> {
        lock(&self.live).rate_limiter
    }

    /// Makes `cmd` on `state`, with the slot locked by the caller (the worker holding the
    /// state, or a control call while no worker does); returns the capacity afterwards and
    /// what was replaced. The executor of `state` must have nothing in flight for a swap.
    fn apply(&self, state: &mut BlockState, cmd: Command) -> (u64, Retired) {
        let mut retired = Retired::default();
        match cmd {
            Command::Swap {
                path,
                disk,
                executor,
            } => {
                debug_assert_eq!(state.executor.in_flight(), 0);
                let capacity = disk.capacity();
                log::info!(
                    "virtio-blk: now {} ({capacity} sectors, {}, {} engine)",
                    path.display(),
                    disk.describe(),
                    executor.name()
                );
                retired._disk = Some(std::mem::replace(&mut state.disk, disk));
                retired._executor = Some(std::mem::replace(&mut state.executor, executor));
                let mut live = lock(&self.live);
                live.path = path;
                live.capacity = capacity;
                live.generation = live.generation.wrapping_add(1);
            }
            Command::Limiter { update, fresh } => {
                RateLimiter::apply_update(
                    &mut state.limiter,
                    &update,
                    fresh.map(|l| *l),
                    &mut retired._limiters,
                );
                let config = state.limiter.as_ref().map(RateLimiter::config);
                log::info!("virtio-blk: rate limiter now {config:?}");
                lock(&self.live).rate_limiter = config;
            }
        }
        (state.disk.capacity(), retired)
    }

    /// Makes `cmd` at once if the state is in `slot` (no worker holds it); gives `cmd` back
    /// otherwise.
    fn apply_here(&self, slot: &mut Slot, cmd: Command) -> Result<(u64, Retired), Command> {
        match slot.state.as_mut() {
            Some(state) => Ok(self.apply(state, cmd)),
            None => Err(cmd),
        }
    }
}

/// Descriptors a worker waits on, before and after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StateFds {
    /// The rate limiter's timer.
    pub(crate) limiter: Option<RawFd>,
    /// The engine's completion eventfd.
    pub(crate) completion: Option<RawFd>,
}

impl StateFds {
    /// Those of `state`.
    pub(crate) fn of(state: &BlockState) -> Self {
        Self {
            limiter: state.limiter.as_ref().map(AsRawFd::as_raw_fd),
            completion: state.executor.completion_fd(),
        }
    }
}

/// What a worker found in the mailbox.
pub(crate) enum Taken {
    /// Nothing (no change, or it was withdrawn).
    Nothing,
    /// A swap waits for the requests in flight to finish.
    Waiting,
    /// A change was made; the interrupt is raised and the caller answered. The worker
    /// updates its sources from `before` to `after`, then drops `retired`.
    Done {
        /// Descriptors before the change.
        before: StateFds,
        /// Descriptors after it.
        after: StateFds,
        /// What was replaced.
        retired: Retired,
        /// Whether the configuration interrupt could be raised (an error fails the worker,
        /// once its sources are moved).
        raised: Result<(), String>,
    },
}

impl Shared {
    /// The worker's side: makes the change waiting in the mailbox, if any, on `state`. A
    /// swap waits while requests are in flight. After a swap, `config_changed` is called
    /// (the worker raises the configuration interrupt) before the caller is answered, with
    /// the slot still locked: taking a change and answering it are one step, so a caller
    /// that times out knows the change was not made (an interrupt only writes an eventfd).
    pub(crate) fn take_command(
        &self,
        state: &mut BlockState,
        config_changed: impl FnOnce() -> Result<(), String>,
    ) -> Result<Taken, String> {
        let mut slot = self.lock_slot();
        let Some(cmd) = slot.command.as_ref() else {
            return Ok(Taken::Nothing);
        };
        if cmd.needs_quiet_disk() && state.executor.in_flight() > 0 {
            return Ok(Taken::Waiting);
        }
        let Some(cmd) = slot.command.take() else {
            return Ok(Taken::Nothing);
        };
        let swap = cmd.needs_quiet_disk();
        let before = StateFds::of(state);
        let (capacity, retired) = self.apply(state, cmd);
        let after = StateFds::of(state);
        // The interrupt goes before the answer, so that once the call returns the guest has
        // been told; a failure still answers (the change is made), and the worker then fails.
        let raised = if swap { config_changed() } else { Ok(()) };
        slot.answer = Some(capacity);
        drop(slot);
        self.changed.notify_all();
        Ok(Taken::Done {
            before,
            after,
            retired,
            raised,
        })
    }
}

/// A handle that changes a [`Block`](super::Block)'s disk while the guest runs: cloneable,
/// usable from any thread, valid for as long as the device exists (and harmless after).
/// Calls are serialized; each waits at most its timeout for a running device thread.
#[derive(Clone)]
pub struct BlockControl {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for BlockControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockControl")
            .field("path", &self.shared.path())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl BlockControl {
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

    /// The image the disk reads now.
    pub fn path(&self) -> PathBuf {
        self.shared.path()
    }

    /// The disk's size in 512-byte sectors now.
    pub fn capacity_sectors(&self) -> u64 {
        self.shared.capacity()
    }

    /// The rate limiter's buckets now (enabled ones only); `None` when nothing is limited.
    pub fn rate_limiter(&self) -> Option<RateLimiterConfig> {
        self.shared.rate_limiter()
    }

    /// Swaps the disk's backing file for `path`, opened on the calling thread exactly as the
    /// device's first image was (read-only, or ephemeral behind a fresh throw-away overlay
    /// that never writes `path`, or read-write; the same engine, and the same serial);
    /// returns the new capacity in 512-byte sectors.
    ///
    /// A running device thread finishes the requests in flight on the old file, switches,
    /// and raises the configuration-change interrupt; the capacity in the configuration
    /// space and the configuration generation change together. Before activation or after a
    /// reset the swap is made at once (the driver reads the capacity when it starts).
    ///
    /// Errors name the file: it cannot be opened (missing, permissions), is not a regular
    /// file or block device, its overlay or ring cannot be set up, or the device thread did
    /// not take the change within the timeout. On any error the old file stays in place and
    /// keeps serving the guest.
    pub fn swap_backing_file(&self, path: PathBuf) -> Result<u64, BlockError> {
        let _one = lock(&self.shared.control);
        let config = BlockConfig {
            path: path.clone(),
            rate_limiter: None,
            ..self.shared.settings.clone()
        };
        let disk = Disk::open(&config)?;
        let executor = Executor::new(config.engine, &disk).map_err(|source| BlockError::Uring {
            path: path.clone(),
            source,
        })?;
        self.install(
            Command::Swap {
                path: path.clone(),
                disk,
                executor,
            },
            &path,
        )
    }

    /// Updates the rate limiter, with Firecracker's semantics (those of a `PATCH
    /// /drives/{id}` body's `rate_limiter`):
    ///
    /// - `None` changes nothing (a PATCH without `rate_limiter`);
    /// - in `Some(update)`, a bucket that is absent (`None`) is kept as it is, tokens
    ///   included; a bucket that is present replaces the old one with a new, full bucket; a
    ///   present bucket with `size` 0 or `refill_time` 0 removes that limit. So
    ///   `{"bandwidth": {"size": 0, "refill_time": 0}, "ops": {"size": 0, "refill_time": 0}}`
    ///   removes all limiting, and `{}` changes nothing.
    ///
    /// A device without a limiter gets one (its timer is created on the calling thread); a
    /// limiter left with no bucket is dropped. Unlike Firecracker, which lets a request held
    /// back by the old buckets wait out the old timer, the request is retried at once under
    /// the new buckets (and, if they cannot pay for it either, waits for them). Made by the
    /// device thread like a swap (between requests, with the same timeout), or at once when
    /// none runs.
    pub fn update_rate_limiter(&self, update: Option<RateLimiterConfig>) -> Result<(), BlockError> {
        let Some(update) = update else {
            return Ok(());
        };
        let _one = lock(&self.shared.control);
        let path = self.shared.path();
        let fresh = if update.is_unlimited() {
            None
        } else {
            Some(Box::new(RateLimiter::new(&update).map_err(|source| {
                BlockError::RateLimiter {
                    path: path.clone(),
                    source,
                }
            })?))
        };
        self.install(Command::Limiter { update, fresh }, &path)
            .map(|_| ())
    }

    /// Makes `cmd`: directly while no worker holds the state, else through the worker.
    fn install(&self, cmd: Command, path: &Path) -> Result<u64, BlockError> {
        let shared = &self.shared;
        let mut slot = shared.lock_slot();
        let cmd = match shared.apply_here(&mut slot, cmd) {
            Ok((capacity, retired)) => {
                drop(slot);
                drop(retired);
                return Ok(capacity);
            }
            Err(cmd) => cmd,
        };
        slot.answer = None;
        slot.command = Some(cmd);
        if let Err(source) = shared.command_evt.write(1) {
            slot.command = None;
            return Err(BlockError::Io {
                path: path.to_path_buf(),
                what: "cannot signal the device thread",
                source,
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(capacity) = slot.answer.take() {
                return Ok(capacity);
            }
            if slot.state.is_some() {
                // The worker stopped (a reset, or it failed) before it took the change: the
                // state is back, so make it here.
                if let Some(cmd) = slot.command.take() {
                    if let Ok((capacity, retired)) = shared.apply_here(&mut slot, cmd) {
                        drop(slot);
                        drop(retired);
                        return Ok(capacity);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let withdrawn = slot.command.take();
                drop(slot);
                drop(withdrawn);
                return Err(BlockError::Timeout {
                    path: path.to_path_buf(),
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
