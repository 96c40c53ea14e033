//! virtio-blk (device type 2): one request queue over a disk image.
//!
//! What lives where:
//! - here: [`Block`], the device (features, configuration space, activation and reset), its
//!   configuration ([`BlockConfig`]), its errors and its [`BlockMetrics`];
//! - `request`: parsing a descriptor chain into a [`Request`], with every check a hostile
//!   guest calls for, and what each request writes back;
//! - `disk` and `overlay`: opening the image (read-write, read-only, or ephemeral behind a
//!   throw-away overlay) and the file operations on it;
//! - `engine`: executing requests, synchronously on the device thread or through io_uring;
//! - `worker`: the device thread ([`BlockWorker`]): queue, rate limiter, completions;
//! - `control`: [`BlockControl`], changing the backing file or the rate limiter while the
//!   guest runs.
//!
//! The disk, the engine (the io_uring ring) and the rate limiter are created by
//! [`Block::new`], before any guest runs, and outlive activations: a worker takes them when
//! the driver sets DRIVER_OK and gives them back when it stops, so a guest reboot keeps an
//! ephemeral disk's writes and no new file descriptor is opened on a device thread. A
//! [`BlockControl`] replaces them at run time: it opens the new ones on its caller's thread
//! and hands them to the worker (or puts them in place itself while no worker runs).

mod control;
mod disk;
mod engine;
mod fileio;
mod overlay;
mod request;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::worker::{spawn, WorkerHandle};
use super::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, TYPE_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

pub use control::{BlockControl, CONTROL_TIMEOUT};
pub use engine::Engine;
pub use overlay::OVERLAY_BLOCK_SIZE;
pub use request::{
    parse, Completion, DiskInfo, HostBuf, Op, Request, RequestKind, ID_BYTES, MAX_DISCARD_SECTORS,
    MAX_REQUEST_BYTES, MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE, SIZE_MAX,
};
pub use worker::BlockWorker;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits of virtio-blk (virtio 1.2, 5.2.3).
pub mod features {
    /// `size_max` is the largest segment the device takes.
    pub const SIZE_MAX: u32 = 1;
    /// `seg_max` is the most data segments in a request.
    pub const SEG_MAX: u32 = 2;
    /// The disk is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` is the logical block size.
    pub const BLK_SIZE: u32 = 6;
    /// The device takes FLUSH requests.
    pub const FLUSH: u32 = 9;
    /// The device takes DISCARD requests.
    pub const DISCARD: u32 = 13;
    /// The device takes WRITE_ZEROES requests.
    pub const WRITE_ZEROES: u32 = 14;
}

/// Size of the configuration space cgvm exposes: up to `write_zeroes_may_unmap` and its
/// padding (virtio 1.2, 5.2.4); the secure-erase and zoned fields are not offered.
pub const CONFIG_SPACE_SIZE: usize = 60;

/// How a disk is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The image: a regular file or a block device.
    pub path: PathBuf,
    /// The guest cannot write (VIRTIO_BLK_F_RO); the file is opened read-only. Takes
    /// precedence over `ephemeral`.
    pub read_only: bool,
    /// Guest writes go to a throw-away overlay; `path` is opened read-only and never written.
    pub ephemeral: bool,
    /// The GET_ID answer, at most [`ID_BYTES`] bytes.
    pub serial: String,
    /// How requests are executed.
    pub engine: Engine,
    /// Limits on bytes and requests per second, if any.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Why a disk could not be attached; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A file operation on the image or its overlay failed.
    #[error("disk {path}: {what}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("disk {path}: not a regular file or a block device")]
    NotADisk {
        /// The image.
        path: PathBuf,
    },
    /// The serial (GET_ID answer) is too long.
    #[error("disk {path}: the id {serial:?} is {len} bytes long; virtio-blk allows {ID_BYTES}")]
    SerialTooLong {
        /// The image.
        path: PathBuf,
        /// The serial.
        serial: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The io_uring engine could not be set up.
    #[error("disk {path}: cannot set up io_uring: {source}")]
    Uring {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The rate limiter could not be created.
    #[error("disk {path}: cannot create the rate limiter: {source}")]
    RateLimiter {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: crate::rate_limiter::RateLimiterError,
    },
    /// The device thread did not take a change ([`BlockControl`]) in time; the change was
    /// withdrawn and the disk is as it was.
    #[error(
        "disk {path}: the device thread did not take the change within {timeout:?}; \
         nothing was changed"
    )]
    Timeout {
        /// The image being installed (for a swap) or in use.
        path: PathBuf,
        /// How long the caller waited.
        timeout: std::time::Duration,
    },
}

/// Counters of one disk, shared with whoever reads them (the VMM's metrics).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Bytes read by successful IN requests.
    pub read_bytes: AtomicU64,
    /// Bytes written by successful OUT requests.
    pub write_bytes: AtomicU64,
    /// Successful IN requests.
    pub read_ops: AtomicU64,
    /// Successful OUT requests.
    pub write_ops: AtomicU64,
    /// Successful FLUSH requests.
    pub flush_ops: AtomicU64,
    /// Requests answered with an error status (IOERR, UNSUPP) or returned without one.
    pub errors: AtomicU64,
    /// Times a request was held back by the rate limiter.
    pub throttled: AtomicU64,
}

impl BlockMetrics {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a worker borrows from the device while it runs: the disk, its engine, its rate
/// limiter and its id.
pub(crate) struct BlockState {
    disk: disk::Disk,
    executor: engine::Executor,
    limiter: Option<RateLimiter>,
    serial: [u8; ID_BYTES],
}

/// The virtio block device.
pub struct Block {
    read_only: bool,
    shared: Arc<control::Shared>,
    metrics: Arc<BlockMetrics>,
    worker: Option<WorkerHandle>,
}

impl Block {
    /// Opens the disk as `config` says (and its overlay, its io_uring ring, its rate
    /// limiter's timer). Every error names the file.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let serial = serial_bytes(&config)?;
        let disk = disk::Disk::open(&config)?;
        let executor =
            engine::Executor::new(config.engine, &disk).map_err(|source| BlockError::Uring {
                path: config.path.clone(),
                source,
            })?;
        let limiter = match &config.rate_limiter {
            Some(rl) if !rl.is_unlimited() => {
                Some(
                    RateLimiter::new(rl).map_err(|source| BlockError::RateLimiter {
                        path: config.path.clone(),
                        source,
                    })?,
                )
            }
            _ => None,
        };
        let capacity = disk.capacity();
        let read_only = disk.read_only();
        log::info!(
            "virtio-blk: {} ({} sectors, {}, {} engine)",
            config.path.display(),
            capacity,
            disk.describe(),
            executor.name()
        );
        let state = BlockState {
            disk,
            executor,
            limiter,
            serial,
        };
        let path = config.path.clone();
        let shared = control::Shared::new(config, state).map_err(|source| BlockError::Io {
            path,
            what: "cannot create the control eventfd",
            source,
        })?;
        Ok(Self {
            read_only,
            shared: Arc::new(shared),
            metrics: Arc::new(BlockMetrics::default()),
            worker: None,
        })
    }

    /// The disk's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// A handle that swaps the backing file or replaces the rate limiter while the guest
    /// runs; take it before the device goes into its transport.
    pub fn control(&self) -> BlockControl {
        BlockControl::new(self.shared.clone())
    }

    /// The disk's size in 512-byte sectors (it changes when the backing file is swapped).
    pub fn capacity_sectors(&self) -> u64 {
        self.shared.capacity()
    }

    /// Whether the guest sees a read-only disk.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The image's path (it changes when the backing file is swapped).
    pub fn path(&self) -> PathBuf {
        self.shared.path()
    }
}

fn serial_bytes(config: &BlockConfig) -> Result<[u8; ID_BYTES], BlockError> {
    let bytes = config.serial.as_bytes();
    if bytes.len() > ID_BYTES {
        return Err(BlockError::SerialTooLong {
            path: config.path.clone(),
            serial: config.serial.clone(),
            len: bytes.len(),
        });
    }
    let mut id = [0u8; ID_BYTES];
    id[..bytes.len()].copy_from_slice(bytes);
    Ok(id)
}

/// The features a disk offers (VERSION_1 is the transport's).
pub fn device_features(read_only: bool) -> u64 {
    let mut f = (1u64 << features::SIZE_MAX)
        | (1 << features::SEG_MAX)
        | (1 << features::BLK_SIZE)
        | (1 << features::FLUSH)
        | (1 << VIRTIO_RING_F_EVENT_IDX);
    if read_only {
        f |= 1 << features::RO;
    } else {
        f |= (1 << features::DISCARD) | (1 << features::WRITE_ZEROES);
    }
    f
}

/// The configuration space of a disk of `capacity` sectors (virtio 1.2, 5.2.4, little endian).
/// Geometry (16..20), topology (24..32) and writeback (32) stay zero: their features are not
/// offered.
pub fn config_space(capacity: u64) -> [u8; CONFIG_SPACE_SIZE] {
    let fields: [(usize, &[u8]); 11] = [
        (0, &capacity.to_le_bytes()),
        (8, &SIZE_MAX.to_le_bytes()),
        (12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()),
        (20, &(SECTOR_SIZE as u32).to_le_bytes()),
        (34, &1u16.to_le_bytes()),
        (36, &MAX_DISCARD_SECTORS.to_le_bytes()),
        (40, &1u32.to_le_bytes()),
        (
            44,
            &((OVERLAY_BLOCK_SIZE / SECTOR_SIZE) as u32).to_le_bytes(),
        ),
        (48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes()),
        (52, &1u32.to_le_bytes()),
        (56, &[1]),
    ];
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    for (offset, bytes) in fields {
        c[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        device_features(self.read_only)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let (capacity, _) = self.shared.config();
        read_config_bytes(&config_space(capacity), offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.shared.config().1
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let Some(mut q) = ctx.queues.pop() else {
            return Err(ActivateError::MissingQueues { want: 1, got });
        };
        if self.worker.is_some() {
            return Err(ActivateError::Backend(format!(
                "virtio-blk {}: activated twice",
                self.shared.path().display()
            )));
        }
        let Some(state) = self.shared.take_state() else {
            return Err(ActivateError::Backend(format!(
                "virtio-blk {}: the disk was lost when a previous device thread failed",
                self.shared.path().display()
            )));
        };
        use virtio_queue::QueueT;
        q.queue
            .set_event_idx(ctx.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let worker = BlockWorker::new(
            ctx.mem,
            q,
            ctx.interrupt.clone(),
            state,
            self.shared.clone(),
            self.metrics.clone(),
        );
        // On failure the worker is dropped here and gives the state back.
        self.worker = Some(spawn(worker, ctx.health, ctx.interrupt)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

/// The seccomp kinds of block device threads, one per engine.
pub(crate) fn seccomp_kinds() -> [&'static crate::seccomp::DeviceKind; 2] {
    [&engine::SYNC_KIND, &engine::URING_KIND]
}

#[cfg(test)]
mod tests;
