//! The `probe.exit=hang` ending: after the checks, instead of spinning blindly, the probe waits
//! in a polling loop that answers what a test does to a running VM through the VMM's API.
//!
//! Before the loop, every virtio-blk device (found like the checks find them, see `discovery`)
//! is (re)started with one small queue whatever state a check left it in (reset, features,
//! queue 0 of 4 entries, DRIVER_OK), its id read (GET_ID), its interrupt causes acknowledged and
//! its ConfigGeneration noted. Then `probe: waiting (probe.exit=hang)` is printed: from then on
//! the probe sees everything below. About every millisecond ([`POLL_MS`], measured with the
//! TSC; every port access traps to the VMM, so it does not poll harder) it:
//!
//! 1. takes the bytes waiting in the i8042 (see `keyboard`); Ctrl+Alt+Del (in scan code set 1
//!    or 2) prints `probe: ctrl-alt-del received, resetting` and ends the run through the
//!    i8042 reset (0xfe to port 0x64), as a Linux guest reboots: cgvm then exits 0;
//! 2. on each disk, reads and acknowledges the interrupt causes and reads ConfigGeneration: a
//!    configuration change interrupt (cause bit 1) or a new generation is a configuration
//!    change (a drive swapped behind the device). The capacity is then read again (retried while
//!    the generation moves, virtio 1.2 2.5.1), and sector `probe.blk_sector` (default 0): `probe:
//!    blk NAME config changed: capacity N sectors, sector S: B0 B1 ... B15` (the first 16 bytes
//!    in hex), NAME the disk's id (GET_ID) or, when that is empty, its index among the
//!    virtio-blk devices (0 for vda). A device no longer DRIVER_OK, or with DEVICE_NEEDS_RESET,
//!    is restarted before the read; a failed read shows `read failed: why` instead of the bytes;
//! 3. with `probe.tick_ms=N`, prints `probe: tick K` (K = 1, 2, ...) every N ms. A tick more
//!    than a period late (the VM was paused: the TSC runs on) is printed once and the next one
//!    is due N ms after it: no burst of missed ticks after a resume.
//!
//! The disks are found on the transports `probe.transport` allows, as the checks find them
//! (virtio-mmio, then virtio-pci: see `discovery`); the queue code is the transport-neutral
//! driver core's (`virtio::Transport`). On virtio-pci MSI-X stays enabled and masked (see
//! `virtio::pci`): a configuration change is seen by its new ConfigGeneration there, since a
//! device need not set the ISR's configuration bit while MSI-X is on.

use core::fmt;

use crate::checks::blk::{
    id_text, StatusName, CONFIG_CAPACITY, F_RO, ID_LEN, SECTOR, S_OK, S_UNWRITTEN, T_GET_ID, T_IN,
};
use crate::checks::{self, Context, Report};
use crate::cmdline::{PciIrq, TransportChoice};
use crate::discovery::{self, Found, FoundList, PciDevice, MAX_DEVICES};
use crate::exit::Ending;
use crate::keyboard::{self, CtrlAltDel};
use crate::println;
use crate::text::{Escaped, Hex};
use crate::tsc::{self, Deadline};
use crate::virtio::{
    self, AnyTransport, DmaBuf, DmaPool, Mmio, SplitQueue, Transport, VirtioError, DEVICE_ID_BLOCK,
    INT_CONFIG_CHANGE, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
};

/// Time between polls, ms.
pub const POLL_MS: u64 = 1;
/// Entries of a watched disk's queue 0 at most (a read takes three descriptors).
const QUEUE_LIMIT: u16 = 4;
/// How long one request may take, ms.
const TIMEOUT_MS: u64 = 2000;
/// Bytes of the sector shown.
pub const SHOWN: usize = 16;
/// The features taken (besides VIRTIO_F_VERSION_1): RO, so that a read-only disk is driven as
/// one (the probe only reads).
const WANTED: u64 = F_RO;
/// The status of a started device.
const STATUS_LIVE: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

/// Waits as the module docs say; returns only to end the run ([`Ending::Reset`], after
/// Ctrl+Alt+Del).
pub fn wait(ctx: &Context<'_>) -> Ending {
    let sector = match ctx.args.blk_sector {
        None => 0,
        Some(Ok(s)) => s,
        Some(Err(raw)) => {
            println!(
                "probe: warning: probe.blk_sector={}: not a sector number; sector 0 is read \
                 on a configuration change",
                Escaped(raw)
            );
            0
        }
    };
    let tick_ms = match ctx.args.tick_ms {
        Some(Ok(ms)) => Some(ms),
        // A bad value failed the run already (see main).
        _ => None,
    };

    // Declared before the disks, whose queues and buffers live in it; held until the run ends
    // (the loop returns only to reset).
    let pool = DmaPool::take();
    let bufs = pool.as_ref().and_then(Buffers::new);
    let mut disks: [Option<Watched<'_, AnyTransport>>; MAX_DEVICES] =
        core::array::from_fn(|_| None);
    match (&pool, &bufs) {
        (Some(pool), Some(bufs)) => watch_disks(ctx, pool, bufs, &mut disks),
        _ => println!(
            "probe: warning: not watching virtio-blk devices: {}",
            VirtioError::NoDma
        ),
    }

    println!("probe: waiting (probe.exit=hang)");
    let mut keys = CtrlAltDel::new();
    let mut ticker =
        tick_ms.map(|ms| Ticker::new(tsc::now(), ms.saturating_mul(tsc::ticks_per_ms())));
    loop {
        let next_poll = Deadline::after_ms(POLL_MS);
        if keyboard::poll(&mut keys) {
            println!("probe: ctrl-alt-del received, resetting");
            return Ending::Reset;
        }
        if let Some(bufs) = &bufs {
            for disk in disks.iter_mut().flatten() {
                if let Some(change) = disk.poll(bufs, sector) {
                    println!("probe: {}", Changed { disk, change });
                }
            }
        }
        if let Some(k) = ticker.as_mut().and_then(|t| t.due(tsc::now())) {
            println!("probe: tick {k}");
        }
        while !next_poll.expired() {
            core::hint::spin_loop();
        }
    }
}

/// Finds the virtio-blk devices, on the transports `probe.transport` allows (as the checks
/// do: virtio-mmio, then virtio-pci), and starts watching each (a warning for what cannot be).
fn watch_disks<'p>(
    ctx: &Context<'_>,
    pool: &'p DmaPool,
    bufs: &Buffers<'p>,
    disks: &mut [Option<Watched<'p, AnyTransport>>],
) {
    // A bad value failed the checks that looked at it; both transports are watched then.
    let choice = match ctx.args.transport {
        Some(Ok(choice)) => choice,
        _ => TransportChoice::Any,
    };
    let mut found = FoundList::new();
    if choice != TransportChoice::Pci {
        let mut report = Report::default();
        match discovery::find(ctx, &mut report) {
            None => println!(
                "probe: warning: not watching virtio-blk devices: {}",
                report.problems()
            ),
            Some(all) => {
                for d in all.as_slice() {
                    match Mmio::new(d.base, d.size).and_then(|m| m.identify()) {
                        Ok(id) if id.device_id == DEVICE_ID_BLOCK => {
                            // `found` is as large as `all`.
                            let _ = found.push(Found::Mmio(*d));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            println!("probe: warning: not watching virtio-mmio device {d}: {e}")
                        }
                    }
                }
            }
        }
    }
    if choice != TransportChoice::Mmio {
        let mut report = Report::default();
        match discovery::find_pci(ctx, &mut report, choice == TransportChoice::Pci) {
            None => println!(
                "probe: warning: not watching virtio-pci devices: {}",
                report.problems()
            ),
            Some(list) => {
                // Several disks stay open at once, so interrupts are watched, never taken
                // (the ring-0 handler acknowledges one function only).
                let irq = match ctx.args.pci_irq {
                    Some(Ok(mode)) => mode.polled(),
                    _ => PciIrq::default(),
                };
                for p in list
                    .iter()
                    .filter(|p| u32::from(p.function.device_type) == DEVICE_ID_BLOCK)
                {
                    let _ = found.push(Found::Pci(PciDevice { irq, ..*p }));
                }
            }
        }
    }
    let mut slots = disks.iter_mut();
    for (k, d) in found.iter().enumerate() {
        let (Some(slot), Some(ring)) = (slots.next(), virtio::queue_memory(pool, QUEUE_LIMIT))
        else {
            println!(
                "probe: warning: not watching virtio-blk device {k} at {}: {}",
                d.at(),
                VirtioError::NoDma
            );
            continue;
        };
        let mut report = Report::default();
        let label = checks::Label {
            kind: "virtio-blk",
            device: d,
        };
        let Some(t) = checks::open(d, &label, &mut report) else {
            println!("probe: warning: not watching {}", report.problems());
            continue;
        };
        let (disk, started) = Watched::start(t, k, ring, bufs);
        if let Err(e) = started {
            println!(
                "probe: warning: blk {} at {}: {e} (restarted on a configuration change)",
                disk.name(),
                d.at()
            );
        }
        *slot = Some(disk);
    }
}

/// Ticks every `period` TSC ticks, counted from 1.
#[derive(Debug, Clone, Copy)]
pub struct Ticker {
    period: u64,
    next: u64,
    count: u64,
}

impl Ticker {
    /// The first tick is due `period` ticks (at least 1) after `now`.
    pub fn new(now: u64, period: u64) -> Self {
        let period = period.max(1);
        Self {
            period,
            next: now.saturating_add(period),
            count: 0,
        }
    }

    /// The number of the tick due at `now`, if one is (at most one a call). The next is due a
    /// period later, or a period after `now` when that is already past: a late tick (a paused
    /// VM) is not followed by the ones missed.
    pub fn due(&mut self, now: u64) -> Option<u64> {
        if now < self.next {
            return None;
        }
        self.count += 1;
        self.next = self.next.saturating_add(self.period);
        if self.next <= now {
            self.next = now.saturating_add(self.period);
        }
        Some(self.count)
    }
}

/// The buffers of a request, shared by the disks (one request at a time).
pub struct Buffers<'p> {
    header: DmaBuf<'p>,
    data: DmaBuf<'p>,
    status: DmaBuf<'p>,
}

impl<'p> Buffers<'p> {
    /// The buffers, from `pool` (`None`: no room).
    pub fn new(pool: &'p DmaPool) -> Option<Self> {
        Some(Self {
            header: pool.alloc(16, 16)?,
            data: pool.alloc(SECTOR as usize, SECTOR as usize)?,
            status: pool.alloc(1, 1)?,
        })
    }
}

/// Why a disk's sector could not be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// Restarting the device failed at a step.
    Start(&'static str, VirtioError),
    /// In the virtio machinery.
    Virtio(VirtioError),
    /// The request ended with another status than OK.
    Status(u8),
    /// The used length is not what the request wrote.
    UsedLen {
        /// What the device reported.
        got: u32,
        /// Expected at least.
        min: u32,
        /// Expected at most.
        max: u32,
    },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Start(step, e) => write!(f, "starting the device: {step}: {e}"),
            Self::Virtio(e) => write!(f, "{e}"),
            Self::Status(s) => write!(f, "status {}", StatusName(*s)),
            Self::UsedLen { got, min, max } if min == max => {
                write!(f, "used length {got}, expected {min}")
            }
            Self::UsedLen { got, min, max } => {
                write!(f, "used length {got}, expected {min}..={max}")
            }
        }
    }
}

/// What a disk says after a configuration change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Its capacity, sectors.
    pub capacity: u64,
    /// The sector read.
    pub sector: u64,
    /// Its first bytes, or why they could not be read.
    pub data: Result<[u8; SHOWN], ReadError>,
}

/// A virtio-blk disk watched for configuration changes.
pub struct Watched<'p, T: Transport> {
    t: T,
    /// Its index among the virtio-blk devices (command-line order).
    index: usize,
    /// Its id (GET_ID; all NUL when unread).
    id: [u8; ID_LEN],
    /// Its queue's memory, kept for restarts.
    ring: DmaBuf<'p>,
    /// Queue 0 while the device is started.
    queue: Option<SplitQueue<'p>>,
    /// The configuration generation seen.
    generation: u32,
    /// A configuration change came while a request was in flight (its interrupt cause was
    /// acknowledged with the request's).
    pending: bool,
    /// How long one request may take, ms.
    timeout_ms: u64,
}

/// A disk's name in the lines: its id, or its index when the id is empty.
pub struct Name<'a> {
    id: &'a [u8],
    index: usize,
}

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.is_empty() {
            write!(f, "{}", self.index)
        } else {
            write!(f, "{}", Escaped(self.id))
        }
    }
}

impl<'p, T: Transport> Watched<'p, T> {
    /// Starts watching the device behind `t`, the `index`-th virtio-blk device: (re)starts it
    /// in `ring` and reads its id. A device that fails is watched all the same (and restarted
    /// on its next configuration change); the error says why.
    pub fn start(
        t: T,
        index: usize,
        ring: DmaBuf<'p>,
        bufs: &Buffers<'_>,
    ) -> (Self, Result<(), ReadError>) {
        let mut disk = Self {
            t,
            index,
            id: [0; ID_LEN],
            ring,
            queue: None,
            generation: 0,
            pending: false,
            timeout_ms: TIMEOUT_MS,
        };
        let started = disk.restart().and_then(|()| disk.read_id(bufs));
        if started.is_err() {
            disk.queue = None;
        }
        disk.t.ack_interrupts();
        disk.generation = disk.t.config_generation();
        (disk, started)
    }

    /// Its name in the lines.
    pub fn name(&self) -> Name<'_> {
        Name {
            id: id_text(&self.id),
            index: self.index,
        }
    }

    /// Resets and starts the device with queue 0 in its ring.
    fn restart(&mut self) -> Result<(), ReadError> {
        self.queue = None;
        let (_, _, queue) = virtio::restart_one_queue(&self.t, self.ring, WANTED, QUEUE_LIMIT)
            .map_err(|(step, e)| ReadError::Start(step, e))?;
        self.queue = Some(queue);
        Ok(())
    }

    /// Whether the device is started and well.
    fn live(&self) -> bool {
        self.queue.is_some() && {
            let status = self.t.status();
            status & STATUS_LIVE == STATUS_LIVE
                && status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED) == 0
        }
    }

    /// Reads the id (GET_ID) into `self.id`.
    fn read_id(&mut self, bufs: &Buffers<'_>) -> Result<(), ReadError> {
        bufs.data.fill(0);
        self.request(bufs, T_GET_ID, 0, ID_LEN, (1, ID_LEN as u32 + 1))?;
        bufs.data.read_bytes(0, &mut self.id);
        Ok(())
    }

    /// One request on queue 0: `kind` at `sector`, `len` bytes into the data buffer; status
    /// OK and a used length in `used` expected. A failed request leaves the device to be
    /// restarted.
    fn request(
        &mut self,
        bufs: &Buffers<'_>,
        kind: u32,
        sector: u64,
        len: usize,
        (min, max): (u32, u32),
    ) -> Result<(), ReadError> {
        let result = self.request_once(bufs, kind, sector, len, (min, max));
        if matches!(result, Err(ReadError::Virtio(_))) {
            // The request may still be in flight: the queue is not reused.
            self.queue = None;
        }
        result
    }

    fn request_once(
        &mut self,
        bufs: &Buffers<'_>,
        kind: u32,
        sector: u64,
        len: usize,
        (min, max): (u32, u32),
    ) -> Result<(), ReadError> {
        let Some(queue) = self.queue.as_mut() else {
            // Not reached: the callers start the device first.
            return Err(ReadError::Virtio(VirtioError::QueueNotReady { index: 0 }));
        };
        bufs.header.write_u32(0, kind);
        bufs.header.write_u32(4, 0);
        bufs.header.write_u64(8, sector);
        bufs.status.write_u8(0, S_UNWRITTEN);
        let segments = [
            bufs.header.readable(16),
            bufs.data.writable(len),
            bufs.status.writable(1),
        ];
        let (used, causes) = virtio::transact_causes(&self.t, queue, &segments, self.timeout_ms)
            .map_err(ReadError::Virtio)?;
        if causes & INT_CONFIG_CHANGE != 0 {
            self.pending = true;
        }
        let status = bufs.status.read_u8(0);
        if status != S_OK {
            return Err(ReadError::Status(status));
        }
        if !(min..=max).contains(&used.len) {
            return Err(ReadError::UsedLen {
                got: used.len,
                min,
                max,
            });
        }
        Ok(())
    }

    /// Looks for a configuration change (its interrupt cause, or a new generation); on one,
    /// what the disk now says: its capacity and the first bytes of `sector`.
    pub fn poll(&mut self, bufs: &Buffers<'_>, sector: u64) -> Option<Change> {
        let causes = self.t.ack_interrupts();
        let generation = self.t.config_generation();
        let changed = core::mem::take(&mut self.pending)
            || causes & INT_CONFIG_CHANGE != 0
            || generation != self.generation;
        if !changed {
            return None;
        }
        // Restarting changes the generation (a reset does on cgvm), so it comes first.
        let started = if self.live() { Ok(()) } else { self.restart() };
        let (capacity, generation) = virtio::read_config_generation(&self.t, |t| {
            u64::from(t.config_u32(CONFIG_CAPACITY))
                | (u64::from(t.config_u32(CONFIG_CAPACITY + 4)) << 32)
        });
        self.generation = generation;
        let data = started.and_then(|()| {
            bufs.data.fill(0);
            let n = SECTOR as u32;
            self.request(bufs, T_IN, sector, SECTOR as usize, (n + 1, n + 1))?;
            let mut first = [0u8; SHOWN];
            bufs.data.read_bytes(0, &mut first);
            Ok(first)
        });
        Some(Change {
            capacity,
            sector,
            data,
        })
    }
}

/// The line for a change (without "probe: "): `blk NAME config changed: capacity N sectors,
/// sector S: HEX` or `...: read failed: why`.
pub struct Changed<'a, 'p, T: Transport> {
    /// The disk.
    pub disk: &'a Watched<'p, T>,
    /// What it says.
    pub change: Change,
}

impl<T: Transport> fmt::Display for Changed<'_, '_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.change;
        write!(
            f,
            "blk {} config changed: capacity {} sectors, sector {}: ",
            self.disk.name(),
            c.capacity,
            c.sector
        )?;
        match &c.data {
            Ok(bytes) => write!(f, "{}", Hex(bytes)),
            Err(e) => write!(f, "read failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
