//! A polling virtio 1.x driver core: the device initialization sequence, split virtqueues in
//! the probe's own memory, and the virtio-mmio transport (register layout version 2, modern
//! only); the virtio-pci transport is in [`pci`]. Nothing here uses interrupts: a request is posted, notified, and its used element
//! polled for with a deadline.
//!
//! What depends on the transport is behind the [`Transport`] trait (status, features, queue
//! registers, notification, configuration space), so that the initialization ([`negotiate`],
//! [`setup_queue`], [`driver_ok`], [`reset`]), the split queue ([`SplitQueue`]) and
//! [`transact`] serve virtio-pci ([`pci::PciTransport`]) as well as [`Mmio`], and net or vsock
//! as well as blk and rng.
//!
//! Device memory: the queues and the buffers live in [`DmaPool`], a 16 KiB page-aligned arena
//! in the probe's `.bss` (physical = virtual in the start code's identity map), handed to one
//! user at a time; the blkbench check takes the large arena instead ([`DmaPool::take_large`],
//! [`LARGE_DMA_ARENA_SIZE`], in its own section after the stacks, not zeroed at start). Rust
//! code never holds a reference into either: every access is a volatile read or write through
//! a raw pointer ([`DmaBuf`]), because the device writes it behind the compiler's back. A pool
//! whose device could not be reset is never handed out again ([`DmaPool::keep_forever`]).
//!
//! Ordering: the driver writes descriptors and the avail ring entry, then a full fence
//! (`compiler_fence` + `fence(SeqCst)`), then the avail index, a fence, then the notify
//! register; it reads the used index, then a fence, then the used element and the buffers.
//!
//! [`transact`] keeps one request in flight. The split queue also takes many chains at once
//! ([`SplitQueue::set_descriptor`], [`SplitQueue::offer`], [`SplitQueue::publish`], which says
//! whether the device wants a notification: VIRTQ_USED_F_NO_NOTIFY, or avail_event with
//! VIRTIO_F_EVENT_IDX), for the blkbench check.

use core::cell::{Cell, UnsafeCell};
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{compiler_fence, fence, AtomicBool, Ordering};

use crate::phys::MMIO_HOLE_START;
use crate::tsc::Deadline;

pub mod pci;

pub use pci::AnyTransport;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// Interrupt cause (InterruptStatus bit 1, the ISR's bit 1 on PCI): the device configuration
/// changed (bit 0: the device used buffers).
pub const INT_CONFIG_CHANGE: u32 = 1 << 1;

/// Feature bit 32: virtio 1.x ("modern") device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit 29: used_event / avail_event index fields (notification suppression).
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;

/// Device ID of a network card.
pub const DEVICE_ID_NET: u32 = 1;
/// Device ID of a socket device (vsock).
pub const DEVICE_ID_VSOCK: u32 = 19;
/// Device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Device ID of an entropy source.
pub const DEVICE_ID_ENTROPY: u32 = 4;

/// Largest split queue (virtio 1.x: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// How many times a configuration read is retried while ConfigGeneration changes under it.
const CONFIG_RETRIES: u32 = 16;
/// How long a reset may take to show (status reading 0), ms.
const RESET_TIMEOUT_MS: u64 = 100;
/// While polling the used ring, the device status is also checked every this many polls.
const STATUS_POLL_INTERVAL: u32 = 4096;

/// Descriptor flag: the chain continues at `next`.
const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;
/// Used ring flag: the device does not need notifications now (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;
/// Avail ring flag: the driver does not want interrupts (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What went wrong driving a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioError {
    /// The register window is outside 0xc0000000..4 GiB, unaligned or too small.
    Window {
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// MagicValue is not "virt".
    Magic(u32),
    /// Version is not 2.
    Version(u32),
    /// The status read back after writing `expected` lacks a bit or has DEVICE_NEEDS_RESET.
    Status {
        /// The step, e.g. "FEATURES_OK".
        after: &'static str,
        /// What was written.
        expected: u8,
        /// What was read back.
        status: u8,
    },
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1 {
        /// Its features.
        features: u64,
    },
    /// QueueNumMax is 0 (no such queue).
    QueueUnavailable {
        /// The queue.
        index: u16,
    },
    /// QueueReady was already 1 before setup.
    QueueAlreadyReady {
        /// The queue.
        index: u16,
    },
    /// QueueReady did not read back 1.
    QueueNotReady {
        /// The queue.
        index: u16,
    },
    /// The DMA memory given is too small or badly aligned for the queue.
    QueueMemory,
    /// The DMA pool is in use or too small.
    NoDma,
    /// A request was posted while another is in flight (one at a time with [`transact`]), or
    /// a chain was offered while the queue holds as many chains as it has entries.
    Busy,
    /// A request with no segments, or more than the queue has descriptors.
    TooManySegments {
        /// Segments asked for.
        segments: usize,
        /// Queue size.
        size: u16,
    },
    /// Status did not read 0 after a reset.
    ResetTimeout {
        /// The status read last.
        status: u8,
    },
    /// The used ring did not move within the deadline.
    Timeout {
        /// The deadline, ms.
        ms: u64,
    },
    /// The device set DEVICE_NEEDS_RESET while a request was pending.
    NeedsReset {
        /// The status.
        status: u8,
    },
    /// The used element names another descriptor than the request's head.
    UsedId {
        /// The id returned.
        id: u32,
        /// The head posted.
        head: u16,
    },
    /// The used index moved by more than the requests in flight.
    UsedOverrun {
        /// The index before.
        from: u16,
        /// The index read.
        to: u16,
    },
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Window { base, size } => write!(
                f,
                "register window 0x{base:x} size 0x{size:x} is not 4-byte aligned, at least \
                 0x200 bytes and inside 0xc0000000..4 GiB"
            ),
            Self::Magic(m) => write!(f, "MagicValue 0x{m:08x} (expected 0x74726976, \"virt\")"),
            Self::Version(v) => write!(f, "Version {v} (expected 2, modern virtio-mmio)"),
            Self::Status {
                after,
                expected,
                status,
            } => {
                write!(
                    f,
                    "status 0x{status:02x} after setting {after} (wrote 0x{expected:02x}"
                )?;
                if status & STATUS_DEVICE_NEEDS_RESET != 0 {
                    write!(f, ", DEVICE_NEEDS_RESET set)")
                } else {
                    write!(f, ", bits 0x{:02x} missing)", expected & !status)
                }
            }
            Self::NoVersion1 { features } => write!(
                f,
                "device features 0x{features:016x} lack VIRTIO_F_VERSION_1 (bit 32)"
            ),
            Self::QueueUnavailable { index } => write!(f, "queue {index}: QueueNumMax is 0"),
            Self::QueueAlreadyReady { index } => {
                write!(f, "queue {index}: QueueReady is 1 before setup")
            }
            Self::QueueNotReady { index } => {
                write!(f, "queue {index}: QueueReady reads 0 after writing 1")
            }
            Self::QueueMemory => write!(f, "queue memory too small or misaligned"),
            Self::NoDma => write!(f, "the probe's DMA memory is in use or too small"),
            Self::Busy => write!(f, "a request is still in flight on the queue"),
            Self::TooManySegments { segments, size } => {
                write!(f, "{segments} segments for a queue of {size}")
            }
            Self::ResetTimeout { status } => write!(
                f,
                "status still 0x{status:02x} {RESET_TIMEOUT_MS} ms after writing 0 (reset)"
            ),
            Self::Timeout { ms } => write!(f, "no answer from the device after {ms} ms"),
            Self::NeedsReset { status } => write!(
                f,
                "the device set DEVICE_NEEDS_RESET (status 0x{status:02x}) during the request"
            ),
            Self::UsedId { id, head } => write!(
                f,
                "used element has id {id}, the request's head descriptor is {head}"
            ),
            Self::UsedOverrun { from, to } => write!(
                f,
                "used index moved from {from} to {to}, past the requests in flight"
            ),
        }
    }
}

/// A failure in a named step on a named device, for a check's report: "DEVICE: STEP: ERROR",
/// or "STEP: no answer from DEVICE after N ms" for a timeout.
pub struct Failure<'a, D: fmt::Display> {
    /// The device, e.g. "vda at 0xc0001000".
    pub device: &'a D,
    /// The step, e.g. "GET_ID".
    pub step: &'a str,
    /// What went wrong.
    pub error: VirtioError,
}

impl<D: fmt::Display> fmt::Display for Failure<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error {
            VirtioError::Timeout { ms } => write!(
                f,
                "{}: no answer from {} after {ms} ms",
                self.step, self.device
            ),
            e => write!(f, "{}: {}: {e}", self.device, self.step),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transports

/// Guest-physical addresses of a split queue's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueAddresses {
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (avail ring).
    pub driver: u64,
    /// Device area (used ring).
    pub device: u64,
}

/// What the driver core needs from a transport. Accessors of queue registers take the queue
/// index (a transport with a selector register selects it first).
pub trait Transport {
    /// Reads the device status.
    fn status(&self) -> u8;
    /// Writes the device status (0 resets the device).
    fn set_status(&self, status: u8);
    /// The 64 device feature bits.
    fn device_features(&self) -> u64;
    /// Writes the 64 driver feature bits.
    fn set_driver_features(&self, features: u64);
    /// The largest size queue `index` takes (0: no such queue).
    fn queue_max(&self, index: u16) -> u32;
    /// Whether queue `index` is ready (enabled).
    fn queue_ready(&self, index: u16) -> bool;
    /// Sets queue `index`'s size and addresses (before it is ready).
    fn set_queue(&self, index: u16, size: u16, addresses: QueueAddresses);
    /// Makes queue `index` ready.
    fn enable_queue(&self, index: u16);
    /// Tells the device that queue `index` has new buffers.
    fn notify(&self, index: u16);
    /// Reads and acknowledges the pending interrupt causes (bit 0 used buffer, bit 1
    /// configuration change).
    fn ack_interrupts(&self) -> u32;
    /// The configuration generation counter.
    fn config_generation(&self) -> u32;
    /// A byte of the device configuration (0 outside it).
    fn config_u8(&self, offset: usize) -> u8;
    /// A little-endian u32 of the device configuration, one 32-bit access (0 outside it).
    fn config_u32(&self, offset: usize) -> u32;
}

/// Reads the device configuration with `read` until ConfigGeneration is the same before and
/// after (a field that spans several accesses is then consistent).
pub fn read_config<T: Transport, R>(t: &T, read: impl Fn(&T) -> R) -> R {
    read_config_generation(t, read).0
}

/// [`read_config`], also returning the generation read last: the one the value belongs to when
/// the retries did not run out, so that a driver watching for configuration changes knows
/// which generation it has seen.
pub fn read_config_generation<T: Transport, R>(t: &T, read: impl Fn(&T) -> R) -> (R, u32) {
    let mut tries = 0;
    loop {
        let before = t.config_generation();
        let value = read(t);
        tries += 1;
        let after = t.config_generation();
        if after == before || tries >= CONFIG_RETRIES {
            return (value, after);
        }
    }
}

/// A little-endian u64 of the device configuration, as two 32-bit accesses in one generation.
pub fn config_u64<T: Transport>(t: &T, offset: usize) -> u64 {
    read_config(t, |t| {
        u64::from(t.config_u32(offset)) | (u64::from(t.config_u32(offset + 4)) << 32)
    })
}

/// virtio-mmio register offsets (version 2).
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const VENDOR_ID: usize = 0x00c;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The register layout version this driver speaks (modern).
pub const MMIO_VERSION: u32 = 2;
/// Smallest register window: the registers and some configuration space.
pub const MMIO_MIN_SIZE: u64 = 0x200;
/// End of the 32-bit MMIO hole (exclusive).
const MMIO_HOLE_END: u64 = 1 << 32;

/// A virtio-mmio device's register window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mmio {
    base: u64,
    size: u64,
}

/// What [`Mmio::identify`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// DeviceID (0: a placeholder with no device behind it).
    pub device_id: u32,
    /// VendorID.
    pub vendor_id: u32,
}

impl Mmio {
    /// The window at `base`: 4-byte aligned, at least [`MMIO_MIN_SIZE`] bytes, inside
    /// 0xc0000000..4 GiB, which the start code maps uncached and where no Rust object lives.
    /// Nothing is read yet.
    pub fn new(base: u64, size: u64) -> Result<Self, VirtioError> {
        let inside = base >= MMIO_HOLE_START
            && base
                .checked_add(size)
                .is_some_and(|end| end <= MMIO_HOLE_END);
        if !inside || !base.is_multiple_of(4) || size < MMIO_MIN_SIZE {
            return Err(VirtioError::Window { base, size });
        }
        Ok(Self { base, size })
    }

    /// Checks MagicValue and Version and reads the device and vendor IDs. Only reads: a window
    /// with something else behind it is left alone.
    pub fn identify(&self) -> Result<Identity, VirtioError> {
        let magic = self.read(reg::MAGIC);
        if magic != MMIO_MAGIC {
            return Err(VirtioError::Magic(magic));
        }
        let version = self.read(reg::VERSION);
        if version != MMIO_VERSION {
            return Err(VirtioError::Version(version));
        }
        Ok(Identity {
            device_id: self.read(reg::DEVICE_ID),
            vendor_id: self.read(reg::VENDOR_ID),
        })
    }

    /// Reads the 32-bit register at `offset` (< 0x100, 4-byte aligned).
    fn read(&self, offset: usize) -> u32 {
        let ptr = (self.base + offset as u64) as *const u32;
        // SAFETY: new() confirmed that the window lies in 0xc0000000..4 GiB, which the start
        // code maps (identity, user-accessible, uncached) and where no Rust object lives, and
        // that it is at least 0x200 bytes and 4-byte aligned; offset is a register offset below
        // 0x100 and a multiple of 4. A volatile 32-bit access is what the device expects.
        unsafe { core::ptr::read_volatile(ptr) }
    }

    /// Writes the 32-bit register at `offset` (< 0x100, 4-byte aligned).
    fn write(&self, offset: usize, value: u32) {
        let ptr = (self.base + offset as u64) as *mut u32;
        // SAFETY: as in read(). Writes go to device registers only (never to memory the
        // compiler knows); what the device then does with guest memory is the DMA pool's
        // business.
        unsafe { core::ptr::write_volatile(ptr, value) }
    }

    /// The configuration space's size in this window.
    fn config_len(&self) -> usize {
        (self.size - reg::CONFIG as u64).min(0x1000) as usize
    }
}

impl Transport for Mmio {
    fn status(&self) -> u8 {
        self.read(reg::STATUS) as u8
    }

    fn set_status(&self, status: u8) {
        self.write(reg::STATUS, u32::from(status));
    }

    fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    fn set_driver_features(&self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn queue_max(&self, index: u16) -> u32 {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.read(reg::QUEUE_NUM_MAX)
    }

    fn queue_ready(&self, index: u16) -> bool {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.read(reg::QUEUE_READY) != 0
    }

    fn set_queue(&self, index: u16, size: u16, a: QueueAddresses) {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.write(reg::QUEUE_NUM, u32::from(size));
        self.write(reg::QUEUE_DESC_LOW, a.desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (a.desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, a.driver as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (a.driver >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, a.device as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (a.device >> 32) as u32);
    }

    fn enable_queue(&self, index: u16) {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.write(reg::QUEUE_READY, 1);
    }

    fn notify(&self, index: u16) {
        self.write(reg::QUEUE_NOTIFY, u32::from(index));
    }

    fn ack_interrupts(&self) -> u32 {
        let pending = self.read(reg::INTERRUPT_STATUS);
        if pending != 0 {
            self.write(reg::INTERRUPT_ACK, pending);
        }
        pending
    }

    fn config_generation(&self) -> u32 {
        self.read(reg::CONFIG_GENERATION)
    }

    fn config_u8(&self, offset: usize) -> u8 {
        if offset >= self.config_len() {
            return 0;
        }
        let ptr = (self.base + (reg::CONFIG + offset) as u64) as *const u8;
        // SAFETY: as in read(): the byte lies inside the checked window, past the registers.
        unsafe { core::ptr::read_volatile(ptr) }
    }

    fn config_u32(&self, offset: usize) -> u32 {
        if !offset.is_multiple_of(4) || offset + 4 > self.config_len() {
            return 0;
        }
        let ptr = (self.base + (reg::CONFIG + offset) as u64) as *const u32;
        // SAFETY: as in read(): four aligned bytes inside the checked window.
        unsafe { core::ptr::read_volatile(ptr) }
    }
}

// ---------------------------------------------------------------------------------------------
// Initialization

/// Resets the device (status 0) and waits until the status reads 0.
pub fn reset<T: Transport>(t: &T) -> Result<(), VirtioError> {
    t.set_status(0);
    let deadline = Deadline::after_ms(RESET_TIMEOUT_MS);
    loop {
        let status = t.status();
        if status == 0 {
            return Ok(());
        }
        if deadline.expired() {
            return Err(VirtioError::ResetTimeout { status });
        }
        core::hint::spin_loop();
    }
}

/// Writes `status` and reads it back: every bit written must be there, and not
/// DEVICE_NEEDS_RESET.
fn set_status<T: Transport>(t: &T, status: u8, after: &'static str) -> Result<(), VirtioError> {
    t.set_status(status);
    let got = t.status();
    if got & status != status || got & STATUS_DEVICE_NEEDS_RESET != 0 {
        return Err(VirtioError::Status {
            after,
            expected: status,
            status: got,
        });
    }
    Ok(())
}

/// The first half of initialization: reset, ACKNOWLEDGE, DRIVER, feature negotiation (the
/// device must offer VIRTIO_F_VERSION_1; the driver takes it and whatever of `wanted` the
/// device offers), FEATURES_OK, confirmed by reading the status back. Returns the features in
/// force and those the device offered.
pub fn negotiate<T: Transport>(t: &T, wanted: u64) -> Result<(u64, u64), VirtioError> {
    reset(t)?;
    set_status(t, STATUS_ACKNOWLEDGE, "ACKNOWLEDGE")?;
    set_status(t, STATUS_ACKNOWLEDGE | STATUS_DRIVER, "DRIVER")?;
    let offered = t.device_features();
    if offered & VIRTIO_F_VERSION_1 == 0 {
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED);
        return Err(VirtioError::NoVersion1 { features: offered });
    }
    let features = offered & (wanted | VIRTIO_F_VERSION_1);
    t.set_driver_features(features);
    set_status(
        t,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        "FEATURES_OK",
    )?;
    Ok((features, offered))
}

/// Sets up queue `index` in `mem` (after [`negotiate`], before [`driver_ok`]): size
/// min(QueueNumMax, `limit`) rounded down to a power of two, zeroed rings, QueueReady = 1
/// read back.
pub fn setup_queue<'a, T: Transport>(
    t: &T,
    index: u16,
    limit: u16,
    mem: DmaBuf<'a>,
) -> Result<SplitQueue<'a>, VirtioError> {
    if t.queue_ready(index) {
        return Err(VirtioError::QueueAlreadyReady { index });
    }
    let size =
        queue_size(t.queue_max(index), limit).ok_or(VirtioError::QueueUnavailable { index })?;
    let queue = SplitQueue::new(mem, index, size).ok_or(VirtioError::QueueMemory)?;
    t.set_queue(index, size, queue.addresses());
    t.enable_queue(index);
    if !t.queue_ready(index) {
        return Err(VirtioError::QueueNotReady { index });
    }
    Ok(queue)
}

/// The end of initialization: DRIVER_OK, confirmed by reading the status back.
pub fn driver_ok<T: Transport>(t: &T) -> Result<(), VirtioError> {
    set_status(
        t,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        "DRIVER_OK",
    )
}

/// The whole start of a device with one queue: [`negotiate`] for `wanted`, queue 0 of at
/// most `limit` entries in memory from `pool`, [`driver_ok`]. Returns the features in force,
/// those offered and the queue; on failure, the step that failed ("init", "queue 0", or
/// "setup" when the pool has no room) and why.
pub fn start_one_queue<'p, T: Transport>(
    t: &T,
    pool: &'p DmaPool,
    wanted: u64,
    limit: u16,
) -> Result<(u64, u64, SplitQueue<'p>), (&'static str, VirtioError)> {
    let (features, offered) = negotiate(t, wanted).map_err(|e| ("init", e))?;
    let layout = QueueLayout::new(limit).ok_or(("setup", VirtioError::QueueMemory))?;
    let ring = pool
        .alloc(layout.len, QueueLayout::ALIGN)
        .ok_or(("setup", VirtioError::NoDma))?;
    let queue = setup_queue(t, 0, limit, ring).map_err(|e| ("queue 0", e))?;
    driver_ok(t).map_err(|e| ("init", e))?;
    Ok((features, offered, queue))
}

/// [`start_one_queue`] with queue memory the caller keeps (from [`queue_memory`]), for a
/// driver that restarts its device in the same memory: the device is reset first, so nothing
/// of it uses the memory any more when the queue is zeroed in it.
pub fn restart_one_queue<'a, T: Transport>(
    t: &T,
    ring: DmaBuf<'a>,
    wanted: u64,
    limit: u16,
) -> Result<(u64, u64, SplitQueue<'a>), (&'static str, VirtioError)> {
    let (features, offered) = negotiate(t, wanted).map_err(|e| ("init", e))?;
    let queue = setup_queue(t, 0, limit, ring).map_err(|e| ("queue 0", e))?;
    driver_ok(t).map_err(|e| ("init", e))?;
    Ok((features, offered, queue))
}

/// Memory from `pool` for a queue of up to `limit` entries (`None`: no room, or `limit` is no
/// queue size).
pub fn queue_memory(pool: &DmaPool, limit: u16) -> Option<DmaBuf<'_>> {
    let layout = QueueLayout::new(limit)?;
    pool.alloc(layout.len, QueueLayout::ALIGN)
}

// ---------------------------------------------------------------------------------------------
// DMA memory

/// Size of the probe's DMA arena.
pub const DMA_ARENA_SIZE: usize = 16 << 10;

/// The arena: page-aligned bytes that Rust code only reaches through raw pointers.
#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; DMA_ARENA_SIZE]>);

// SAFETY: the bytes are only accessed through DmaPool, which one user holds at a time
// (ARENA_TAKEN), with volatile raw-pointer accesses.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; DMA_ARENA_SIZE]));
/// Whether a DmaPool over ARENA exists (or was kept forever).
static ARENA_TAKEN: AtomicBool = AtomicBool::new(false);

/// Size of the large DMA arena: 8 MiB of data buffers (8 requests of 1 MiB, or 2048 of 4 KiB)
/// and 64 KiB for a queue and request headers.
pub const LARGE_DMA_ARENA_SIZE: usize = (8 << 20) + (64 << 10);

// The large arena: page-aligned, in its own `@nobits` section that link.ld places after the
// stacks, outside `.bss`, so that the ring-0 start code does not spend time zeroing it (that
// runs emulated on a PVM host); it adds to the image's memory size, not to the file.
// [`DmaBuf`] zeroes what it hands out.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .probe_dma, \"aw\", @nobits",
    ".balign 4096",
    ".globl probe_dma_large",
    "probe_dma_large:",
    ".skip {size}",
    ".popsection",
    size = const LARGE_DMA_ARENA_SIZE,
);

#[cfg(not(test))]
extern "C" {
    /// The large arena (defined above). Only [`DmaPool`] touches it, through raw pointers.
    static mut probe_dma_large: [u8; LARGE_DMA_ARENA_SIZE];
}

/// Whether a DmaPool over the large arena exists (or was kept forever).
static LARGE_ARENA_TAKEN: AtomicBool = AtomicBool::new(false);

/// Memory that devices read and write: a bump allocator over a fixed region, one holder at a
/// time. Dropping it makes the region available again; so reset the device first.
pub struct DmaPool {
    base: *mut u8,
    len: usize,
    next: Cell<usize>,
    /// The flag to clear on drop (`None` for a test region).
    owner: Option<&'static AtomicBool>,
}

impl DmaPool {
    /// The probe's arena, unless another holder has it.
    pub fn take() -> Option<Self> {
        ARENA_TAKEN
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(Self {
            base: ARENA.0.get().cast::<u8>(),
            len: DMA_ARENA_SIZE,
            next: Cell::new(0),
            owner: Some(&ARENA_TAKEN),
        })
    }

    /// The large arena ([`LARGE_DMA_ARENA_SIZE`] bytes), unless another holder has it.
    #[cfg(not(test))]
    pub fn take_large() -> Option<Self> {
        LARGE_ARENA_TAKEN
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Only the address is taken (no reference is made): the arena is defined in the
        // global_asm! above with this size, page-aligned, and only DmaPool, one holder at a
        // time (LARGE_ARENA_TAKEN), accesses it, with volatile raw-pointer accesses.
        let base = core::ptr::addr_of_mut!(probe_dma_large).cast::<u8>();
        Some(Self {
            base,
            len: LARGE_DMA_ARENA_SIZE,
            next: Cell::new(0),
            owner: Some(&LARGE_ARENA_TAKEN),
        })
    }

    /// Host unit tests have no large arena.
    #[cfg(test)]
    pub fn take_large() -> Option<Self> {
        None
    }

    /// A pool over `len` bytes at `base`, for unit tests.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to 4096, for as long as
    /// the pool and its buffers live, and not accessed otherwise meanwhile.
    #[cfg(test)]
    pub unsafe fn over(base: *mut u8, len: usize) -> Self {
        Self {
            base,
            len,
            next: Cell::new(0),
            owner: None,
        }
    }

    /// `len` zeroed bytes aligned to `align` (a power of two, at most 4096); `None` when the pool
    /// is used up.
    pub fn alloc(&self, len: usize, align: usize) -> Option<DmaBuf<'_>> {
        if !align.is_power_of_two() || align > 4096 {
            return None;
        }
        let start = self.next.get().checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        self.next.set(end);
        let buf = DmaBuf {
            // SAFETY: start <= end <= self.len, so the pointer stays inside the region.
            ptr: unsafe { self.base.add(start) },
            len,
            _pool: PhantomData,
        };
        buf.fill(0);
        Some(buf)
    }

    /// Gives up the pool without making it available again: for when a device that may still
    /// write to it could not be reset.
    pub fn keep_forever(self) {
        core::mem::forget(self);
    }
}

impl Drop for DmaPool {
    fn drop(&mut self) {
        if let Some(flag) = self.owner {
            flag.store(false, Ordering::Release);
        }
    }
}

/// A buffer in a [`DmaPool`]: its guest-physical address is its address (identity map). Every
/// access is volatile and bounds-checked: an access outside it reads 0 or writes nothing.
#[derive(Clone, Copy)]
pub struct DmaBuf<'a> {
    ptr: *mut u8,
    len: usize,
    _pool: PhantomData<&'a DmaPool>,
}

impl DmaBuf<'_> {
    /// Its guest-physical address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The pointer to `size` bytes at `offset`, if they are inside and aligned to `size`.
    fn at(&self, offset: usize, size: usize) -> Option<*mut u8> {
        let end = offset.checked_add(size)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset + size <= len: inside the buffer.
        let p = unsafe { self.ptr.add(offset) };
        (p as usize).is_multiple_of(size).then_some(p)
    }

    /// Reads the byte at `offset`.
    pub fn read_u8(&self, offset: usize) -> u8 {
        match self.at(offset, 1) {
            // SAFETY: at() checked the bounds; the pool's region is valid memory that only
            // volatile raw accesses touch (the device may write it at any time).
            Some(p) => unsafe { p.read_volatile() },
            None => 0,
        }
    }

    /// Writes the byte at `offset`.
    pub fn write_u8(&self, offset: usize, value: u8) {
        if let Some(p) = self.at(offset, 1) {
            // SAFETY: as in read_u8.
            unsafe { p.write_volatile(value) }
        }
    }

    /// Reads the naturally aligned little-endian u16 at `offset` in one access.
    pub fn read_u16(&self, offset: usize) -> u16 {
        match self.at(offset, 2) {
            // SAFETY: as in read_u8; at() also checked 2-byte alignment.
            Some(p) => u16::from_le(unsafe { p.cast::<u16>().read_volatile() }),
            None => 0,
        }
    }

    /// Writes the naturally aligned little-endian u16 at `offset` in one access.
    pub fn write_u16(&self, offset: usize, value: u16) {
        if let Some(p) = self.at(offset, 2) {
            // SAFETY: as in read_u16.
            unsafe { p.cast::<u16>().write_volatile(value.to_le()) }
        }
    }

    /// Reads the naturally aligned little-endian u32 at `offset` in one access.
    pub fn read_u32(&self, offset: usize) -> u32 {
        match self.at(offset, 4) {
            // SAFETY: as in read_u8; at() also checked 4-byte alignment.
            Some(p) => u32::from_le(unsafe { p.cast::<u32>().read_volatile() }),
            None => 0,
        }
    }

    /// Writes the naturally aligned little-endian u32 at `offset` in one access.
    pub fn write_u32(&self, offset: usize, value: u32) {
        if let Some(p) = self.at(offset, 4) {
            // SAFETY: as in read_u32.
            unsafe { p.cast::<u32>().write_volatile(value.to_le()) }
        }
    }

    /// Reads the naturally aligned little-endian u64 at `offset` in one access.
    #[allow(dead_code)] // for 64-bit header fields (vsock); blk and rng only write them
    pub fn read_u64(&self, offset: usize) -> u64 {
        match self.at(offset, 8) {
            // SAFETY: as in read_u8; at() also checked 8-byte alignment.
            Some(p) => u64::from_le(unsafe { p.cast::<u64>().read_volatile() }),
            None => 0,
        }
    }

    /// Writes the naturally aligned little-endian u64 at `offset` in one access.
    pub fn write_u64(&self, offset: usize, value: u64) {
        if let Some(p) = self.at(offset, 8) {
            // SAFETY: as in read_u64.
            unsafe { p.cast::<u64>().write_volatile(value.to_le()) }
        }
    }

    /// Sets every byte to `value` (eight at a time where aligned: megabyte buffers).
    pub fn fill(&self, value: u8) {
        let head = self.ptr.align_offset(8).min(self.len);
        let words = (self.len - head) / 8;
        let word = u64::from_ne_bytes([value; 8]);
        for i in 0..head {
            self.write_u8(i, value);
        }
        for w in 0..words {
            self.write_u64(head + 8 * w, word);
        }
        for i in head + 8 * words..self.len {
            self.write_u8(i, value);
        }
    }

    /// Copies `bytes` in from `offset` (what does not fit is dropped).
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            self.write_u8(offset.saturating_add(i), b);
        }
    }

    /// Copies bytes out from `offset` into `out` (0 past the end).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.read_u8(offset.saturating_add(i));
        }
    }

    /// A device-readable segment of its first `len` bytes.
    pub fn readable(&self, len: usize) -> Segment {
        Segment {
            addr: self.addr(),
            len: len.min(self.len) as u32,
            device_writes: false,
        }
    }

    /// A device-writable segment of its first `len` bytes.
    pub fn writable(&self, len: usize) -> Segment {
        Segment {
            addr: self.addr(),
            len: len.min(self.len) as u32,
            device_writes: true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Split virtqueues

/// Where a split queue's parts lie in its memory: the descriptor table (16 bytes an entry,
/// align 16), then the driver area (avail ring: flags, idx, ring[size], used_event; u16 each;
/// align 2), then the device area (used ring: flags, idx (u16), ring[size] of (id, len) (u32),
/// avail_event (u16); align 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Entries.
    pub size: u16,
    /// Offset of the descriptor table (0).
    pub desc: usize,
    /// Offset of the avail ring.
    pub avail: usize,
    /// Offset of the used ring.
    pub used: usize,
    /// Bytes in all.
    pub len: usize,
}

/// Rounds `n` up to a multiple of `align` (a power of two).
const fn align_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

impl QueueLayout {
    /// Alignment of the whole (that of the descriptor table).
    pub const ALIGN: usize = 16;

    /// The layout for `size` entries; `None` unless `size` is a power of two up to 32768.
    pub const fn new(size: u16) -> Option<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return None;
        }
        let n = size as usize;
        let desc = 0;
        let avail = align_up(desc + 16 * n, 2);
        let used = align_up(avail + 6 + 2 * n, 4);
        let len = used + 6 + 8 * n;
        Some(Self {
            size,
            desc,
            avail,
            used,
            len,
        })
    }
}

/// The queue size to use: the largest power of two that is at most `max` (QueueNumMax),
/// `limit` and 32768; `None` when `max` is 0.
pub fn queue_size(max: u32, limit: u16) -> Option<u16> {
    let cap = max.min(u32::from(limit)).min(u32::from(MAX_QUEUE_SIZE));
    if cap == 0 {
        return None;
    }
    Some(1 << (31 - cap.leading_zeros()))
}

/// One buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Whether the device writes it (else it reads it).
    pub device_writes: bool,
}

/// An element of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor of the chain.
    pub id: u32,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// A split virtqueue. [`push`](Self::push) posts one request at a time, its chain in
/// descriptors 0, 1, ...; or the caller writes chains where it likes
/// ([`set_descriptor`](Self::set_descriptor)) and keeps many in flight
/// ([`offer`](Self::offer), [`publish`](Self::publish)). The avail and used indexes run on.
pub struct SplitQueue<'a> {
    mem: DmaBuf<'a>,
    layout: QueueLayout,
    index: u16,
    /// The driver's next avail index.
    avail_idx: u16,
    /// The avail index the device was last shown.
    published: u16,
    /// The used index up to which elements were taken.
    used_idx: u16,
    /// Requests posted and not yet used.
    in_flight: u16,
}

impl<'a> SplitQueue<'a> {
    /// A queue of `size` entries for queue `index`, in `mem` (zeroed), or `None` if `mem` is
    /// too small or not 16-byte aligned, or `size` is no queue size.
    pub fn new(mem: DmaBuf<'a>, index: u16, size: u16) -> Option<Self> {
        let layout = QueueLayout::new(size)?;
        if mem.len() < layout.len || !mem.addr().is_multiple_of(QueueLayout::ALIGN as u64) {
            return None;
        }
        mem.fill(0);
        Some(Self {
            mem,
            layout,
            index,
            avail_idx: 0,
            published: 0,
            used_idx: 0,
            in_flight: 0,
        })
    }

    /// Its size (entries; also its number of descriptors).
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// The queue's index on its device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Where its parts are.
    pub fn addresses(&self) -> QueueAddresses {
        let base = self.mem.addr();
        QueueAddresses {
            desc: base + self.layout.desc as u64,
            driver: base + self.layout.avail as u64,
            device: base + self.layout.used as u64,
        }
    }

    /// Posts a request: `segments` chained in descriptors 0.., the head in the avail ring, the
    /// avail index bumped (after a fence). Returns the head. The caller then notifies.
    pub fn push(&mut self, segments: &[Segment]) -> Result<u16, VirtioError> {
        let size = self.layout.size;
        if self.in_flight != 0 {
            return Err(VirtioError::Busy);
        }
        if segments.is_empty() || segments.len() > usize::from(size) {
            return Err(VirtioError::TooManySegments {
                segments: segments.len(),
                size,
            });
        }
        for (i, s) in segments.iter().enumerate() {
            let next = (i + 1 < segments.len()).then_some((i + 1) as u16);
            self.set_descriptor(i as u16, *s, next);
        }
        let head = 0u16;
        self.offer(head)?;
        self.publish(false);
        Ok(head)
    }

    /// Writes descriptor `i` (below the queue size; others are ignored): `segment`, chained to
    /// descriptor `next` when given.
    pub fn set_descriptor(&mut self, i: u16, segment: Segment, next: Option<u16>) {
        if i >= self.layout.size {
            return;
        }
        let d = self.layout.desc + 16 * usize::from(i);
        let mut flags = if segment.device_writes {
            DESC_F_WRITE
        } else {
            0
        };
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        self.mem.write_u64(d, segment.addr);
        self.mem.write_u32(d + 8, segment.len);
        self.mem.write_u16(d + 12, flags);
        self.mem.write_u16(d + 14, next.unwrap_or(0));
    }

    /// Offers the chain that starts at descriptor `head` (written with
    /// [`set_descriptor`](Self::set_descriptor)): its avail ring entry. The device sees it after
    /// [`publish`](Self::publish). `Busy` when as many chains as the queue has entries are in
    /// flight already.
    pub fn offer(&mut self, head: u16) -> Result<(), VirtioError> {
        if self.in_flight >= self.layout.size {
            return Err(VirtioError::Busy);
        }
        let slot = usize::from(self.avail_idx % self.layout.size);
        self.mem.write_u16(self.layout.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
        Ok(())
    }

    /// Shows the device the chains offered since the last call: a fence, the avail index, a
    /// fence. Returns whether the device asked to be notified of them: with
    /// VIRTIO_F_EVENT_IDX (`event_idx`), when the new index passed the used ring's avail_event
    /// (virtio 1.2, 2.7.10); without, unless the used ring's flags have NO_NOTIFY. Nothing to
    /// show: false.
    pub fn publish(&mut self, event_idx: bool) -> bool {
        let old = self.published;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        barrier();
        self.mem.write_u16(self.layout.avail + 2, new);
        self.published = new;
        barrier();
        if event_idx {
            let avail_event = self
                .mem
                .read_u16(self.layout.used + 4 + 8 * usize::from(self.layout.size));
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.mem.read_u16(self.layout.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Asks the device not to interrupt (for a driver that polls): with VIRTIO_F_EVENT_IDX
    /// (`event_idx`), used_event is put half the index space ahead of the used elements taken,
    /// where the device cannot reach before the next call (call it after taking used
    /// elements); without, the avail ring's flags get NO_INTERRUPT (a hint the device may
    /// ignore).
    pub fn suppress_interrupts(&mut self, event_idx: bool) {
        if event_idx {
            let used_event = self.layout.avail + 4 + 2 * usize::from(self.layout.size);
            self.mem
                .write_u16(used_event, self.used_idx.wrapping_add(0x8000));
        } else {
            self.mem.write_u16(self.layout.avail, AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Chains offered and not yet used.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The device's used index, as last written (one volatile read).
    pub fn used_index(&self) -> u16 {
        self.device_used_idx()
    }

    /// The device's used index, as last written.
    fn device_used_idx(&self) -> u16 {
        self.mem.read_u16(self.layout.used + 2)
    }

    /// Takes the next used element, if the device has returned one.
    pub fn pop_used(&mut self) -> Result<Option<Used>, VirtioError> {
        let idx = self.device_used_idx();
        self.pop_used_before(idx)
    }

    /// Takes the next used element if the device's used index, read as `idx` (by
    /// [`used_index`](Self::used_index)), is past it; saves re-reading the index for each
    /// element of a batch.
    pub fn pop_used_before(&mut self, idx: u16) -> Result<Option<Used>, VirtioError> {
        if idx == self.used_idx {
            return Ok(None);
        }
        if idx.wrapping_sub(self.used_idx) > self.in_flight {
            return Err(VirtioError::UsedOverrun {
                from: self.used_idx,
                to: idx,
            });
        }
        barrier();
        let slot = usize::from(self.used_idx % self.layout.size);
        let e = self.layout.used + 4 + 8 * slot;
        let used = Used {
            id: self.mem.read_u32(e),
            len: self.mem.read_u32(e + 4),
        };
        self.used_idx = self.used_idx.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Some(used))
    }
}

/// A full memory barrier for the compiler and the CPU.
fn barrier() {
    compiler_fence(Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Posts `segments` on `queue`, notifies the device, and polls for the used element until
/// `timeout_ms` pass (the device status is checked now and then: DEVICE_NEEDS_RESET ends the
/// wait). Interrupt causes are acknowledged when the element arrives. The element must name
/// the request's head.
pub fn transact<T: Transport>(
    t: &T,
    queue: &mut SplitQueue<'_>,
    segments: &[Segment],
    timeout_ms: u64,
) -> Result<Used, VirtioError> {
    transact_causes(t, queue, segments, timeout_ms).map(|(used, _)| used)
}

/// [`transact`], also returning the interrupt causes it acknowledged (bit 0, used buffers, and
/// [`INT_CONFIG_CHANGE`]), so that a driver watching for configuration changes does not lose
/// one that came during the request.
pub fn transact_causes<T: Transport>(
    t: &T,
    queue: &mut SplitQueue<'_>,
    segments: &[Segment],
    timeout_ms: u64,
) -> Result<(Used, u32), VirtioError> {
    let head = queue.push(segments)?;
    t.notify(queue.index());
    let deadline = Deadline::after_ms(timeout_ms);
    let mut polls = 0u32;
    loop {
        if let Some(used) = queue.pop_used()? {
            let causes = t.ack_interrupts();
            if used.id != u32::from(head) {
                return Err(VirtioError::UsedId { id: used.id, head });
            }
            return Ok((used, causes));
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(STATUS_POLL_INTERVAL) {
            let status = t.status();
            if status & STATUS_DEVICE_NEEDS_RESET != 0 {
                return Err(VirtioError::NeedsReset { status });
            }
        }
        if deadline.expired() {
            return Err(VirtioError::Timeout { ms: deadline.ms() });
        }
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests;
