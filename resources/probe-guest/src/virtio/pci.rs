//! The virtio-pci transport (virtio 1.2, 4.1, modern devices only): the driver core's
//! [`Transport`] over a function's common configuration, notification, ISR and device
//! configuration structures (found by `pci`), and [`AnyTransport`], which is either this or
//! virtio-mmio, for the checks.
//!
//! Interrupts stay off, MSI-X "masked and polled": [`PciTransport::open`] turns on memory
//! decode and bus mastering (INTx disabled), writes every MSI-X table entry (the local APIC's
//! address, a vector number, the entry itself unmasked), then enables MSI-X with the function
//! mask set, so no message can leave the device. When a queue is set up, the configuration
//! vector becomes 0 and queue `i` gets vector [`queue_vector`] (read back: NO_VECTOR means the
//! device refused it). The queues are polled as on virtio-mmio; a masked vector the device
//! signals sets its bit in the pending bit array (PBA) instead, which
//! [`PciTransport::ack_interrupts`] watches: after the device used a buffer the bit of a
//! queue's vector must be set ([`PciTransport::msix_verdict`]), which shows that the device
//! signals through MSI-X and respects the mask. The ISR is read (and so cleared) as well: with
//! MSI-X enabled a device need not set it.
//!
//! ```text
//! common configuration (virtio_pci_common_cfg)
//! 0x00 device_feature_select u32   0x04 device_feature u32
//! 0x08 driver_feature_select u32   0x0c driver_feature u32
//! 0x10 config_msix_vector u16      0x12 num_queues u16
//! 0x14 device_status u8            0x15 config_generation u8
//! 0x16 queue_select u16            0x18 queue_size u16
//! 0x1a queue_msix_vector u16       0x1c queue_enable u16
//! 0x1e queue_notify_off u16        0x20 queue_desc u64
//! 0x28 queue_driver u64            0x30 queue_device u64
//! notify address of queue q: notify.offset + queue_notify_off(q) * notify_off_multiplier
//! ```
//!
//! Every field is accessed with its natural width, 64-bit ones as two 32-bit halves (low
//! first), as the spec lets a driver do.

use core::cell::Cell;
use core::fmt;

use super::{Mmio, QueueAddresses, Transport};
use crate::mmio::Regs;
use crate::pci::{
    self, ConfigAccess, Ecam, VirtioFunction, COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE,
    COMMAND_MEMORY, MSIX_ENABLE, MSIX_ENTRY_LEN, MSIX_FUNCTION_MASK,
};

/// Common configuration offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// The fields above (virtio 1.0's structure).
    pub const LEN: u64 = 0x38;
}

/// The common configuration structure's length in virtio 1.0 (the fields this driver uses).
pub const COMMON_CFG_LEN: u64 = common::LEN;
/// "No vector" in config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;
/// The vector of configuration changes.
pub const CONFIG_VECTOR: u16 = 0;
/// The address an MSI-X table entry gets: the local APIC (destination 0, physical).
const MSI_ADDRESS: u32 = 0xfee0_0000;
/// The first interrupt vector a table entry names (entry k: this + k).
const MSI_FIRST_VECTOR: u32 = 0x40;
/// Table entries written at most (the rest keep what they hold: the function mask covers
/// them all).
const MAX_TABLE_WRITES: u16 = 64;
/// Queues whose notify offset is remembered (others are read at each notification).
const CACHED_QUEUES: usize = 8;

/// The MSI-X vector of queue `index` on a table of `table_size` entries: vector 0 is the
/// configuration's, queue i gets 1 + i while there are entries, the last entry after that
/// (a table of one entry: everything on 0).
pub fn queue_vector(index: u16, table_size: u16) -> u16 {
    index.saturating_add(1).min(table_size.saturating_sub(1))
}

/// Why a function cannot be driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// A structure is not in a memory BAR inside 0xc0000000..4 GiB, or too short.
    Region {
        /// Which ("COMMON_CFG", "MSI-X table", ...).
        what: &'static str,
        /// Its address, if its BAR is a memory BAR.
        addr: Option<u64>,
        /// Its length.
        length: u32,
        /// The least length the driver needs.
        need: u32,
    },
    /// The command register did not take memory decode and bus mastering.
    Command(u16),
    /// Message control did not read back with MSI-X enabled and masked.
    Msix(u16),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Region {
                what,
                addr,
                length,
                need,
            } => {
                write!(f, "{what} ")?;
                match addr {
                    Some(a) => write!(f, "at 0x{a:x}")?,
                    None => write!(f, "is not in a memory BAR")?,
                }
                write!(
                    f,
                    ", {length} bytes (needs {need} bytes inside 0xc0000000..4 GiB)"
                )
            }
            Self::Command(c) => write!(
                f,
                "command register reads 0x{c:04x} after enabling memory decode and bus mastering"
            ),
            Self::Msix(c) => write!(
                f,
                "MSI-X message control reads 0x{c:04x} after setting enable and function mask"
            ),
        }
    }
}

/// The MSI-X state of an open function.
#[derive(Debug, Clone, Copy)]
struct MsixRegs {
    table_size: u16,
    pba: Regs,
}

/// What the MSI-X pending bits showed while the device was driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixVerdict {
    /// The function has no MSI-X capability (the ISR is polled alone).
    NoMsix,
    /// No queue vector is pending, and no used buffer was acknowledged (a driver that polls
    /// its used rings itself does not say): nothing to see.
    Untested,
    /// A queue vector was pending already when the function was opened (left from an
    /// earlier driver): nothing proven.
    PendingBefore(u16),
    /// After a used buffer this queue vector was pending: the device signalled it, masked.
    Pending(u16),
    /// The device refused a vector: queue (or `None` for the configuration), vector written,
    /// value read back.
    Refused(Option<u16>, u16, u16),
    /// Used buffers were acknowledged, and no queue vector is pending.
    NotPending {
        /// Used-buffer acknowledgements seen.
        acks: u32,
    },
}

impl fmt::Display for MsixVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoMsix => write!(f, "no MSI-X"),
            Self::Untested => write!(f, "MSI-X masked"),
            Self::PendingBefore(v) => write!(f, "MSI-X masked, vector {v} pending from before"),
            Self::Pending(v) => write!(f, "MSI-X masked, vector {v} pending"),
            Self::Refused(queue, wrote, read) => {
                match queue {
                    Some(q) => write!(f, "MSI-X: queue {q}'s queue_msix_vector reads ")?,
                    None => write!(f, "MSI-X: config_msix_vector reads ")?,
                }
                if read == NO_VECTOR {
                    write!(f, "NO_VECTOR (0xffff)")?;
                } else {
                    write!(f, "{read}")?;
                }
                write!(f, " after writing {wrote}")
            }
            Self::NotPending { acks } => write!(
                f,
                "MSI-X: the device used buffers ({acks} polls found them) but no queue vector is \
                 pending in the PBA: with the function masked, a used buffer must set its \
                 vector's pending bit"
            ),
        }
    }
}

impl MsixVerdict {
    /// Whether this is a problem.
    pub fn failed(&self) -> bool {
        matches!(self, Self::Refused(..) | Self::NotPending { .. })
    }
}

/// A virtio-pci function, open for the driver core.
pub struct PciTransport {
    common: Regs,
    notify: Regs,
    notify_mult: u32,
    isr: Regs,
    device: Option<Regs>,
    msix: Option<MsixRegs>,
    num_queues: u16,
    notify_offs: [Cell<Option<u16>>; CACHED_QUEUES],
    /// Queue vectors pending when opened (bit per vector below 64).
    pending_at_open: u64,
    /// ack_interrupts calls (a used buffer was found before each, in `transact`).
    acks: Cell<u32>,
    /// The first queue vector seen pending.
    pending_seen: Cell<Option<u16>>,
    /// The first vector the device refused.
    refused: Cell<Option<(Option<u16>, u16, u16)>>,
}

impl PciTransport {
    /// Opens `f` (configuration space through `ecam`) as the module docs say: memory decode
    /// and bus mastering on, MSI-X enabled and masked. Nothing of the virtio device is touched.
    pub fn open(ecam: &Ecam, f: &VirtioFunction) -> Result<Self, OpenError> {
        let region = |what, r: &pci::Region, need: u64| {
            let err = OpenError::Region {
                what,
                addr: f.address(r),
                length: r.length,
                need: need as u32,
            };
            match f.regs(r) {
                Some(regs) if regs.len() >= need => Ok(regs),
                _ => Err(err),
            }
        };
        let l = &f.layout;
        let common = region("COMMON_CFG", &l.common, common::LEN)?;
        let notify = region("NOTIFY_CFG", &l.notify, 2)?;
        let isr = region("ISR_CFG", &l.isr, 1)?;
        let device = match &l.device {
            Some(d) => Some(region("DEVICE_CFG", d, 0)?),
            None => None,
        };
        let msix_regions = match &f.msix {
            Some(m) => Some((
                m,
                region("MSI-X table", &m.table, u64::from(m.table.length))?,
                region("MSI-X PBA", &m.pba, u64::from(m.pba.length))?,
            )),
            None => None,
        };

        let bdf = f.bdf;
        let dword = ecam.read_u32(bdf, COMMAND) & 0xffff;
        let want = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        // The status half written as 0: its bits are write-1-to-clear.
        ecam.write_u32(bdf, COMMAND, dword | u32::from(want));
        let command = ecam.read_u32(bdf, COMMAND) as u16;
        if command & (COMMAND_MEMORY | COMMAND_BUS_MASTER) != COMMAND_MEMORY | COMMAND_BUS_MASTER {
            return Err(OpenError::Command(command));
        }

        let mut msix = None;
        let mut pending_at_open = 0;
        if let Some((m, table, pba)) = msix_regions {
            for k in 0..m.table_size.min(MAX_TABLE_WRITES) {
                let e = u64::from(k) * MSIX_ENTRY_LEN;
                table.write_u32(e, MSI_ADDRESS);
                table.write_u32(e + 4, 0);
                table.write_u32(e + 8, MSI_FIRST_VECTOR + u32::from(k));
                table.write_u32(e + 12, 0);
            }
            let at = u16::from(m.at);
            let cap = ecam.read_u32(bdf, at);
            let control = (cap >> 16) as u16 | MSIX_ENABLE | MSIX_FUNCTION_MASK;
            ecam.write_u32(bdf, at, (cap & 0xffff) | u32::from(control) << 16);
            let back = (ecam.read_u32(bdf, at) >> 16) as u16;
            if back & (MSIX_ENABLE | MSIX_FUNCTION_MASK) != MSIX_ENABLE | MSIX_FUNCTION_MASK {
                return Err(OpenError::Msix(back));
            }
            let regs = MsixRegs {
                table_size: m.table_size,
                pba,
            };
            pending_at_open = (1..m.table_size.min(64))
                .filter(|&v| pending(&regs, v))
                .fold(0u64, |acc, v| acc | 1 << v);
            msix = Some(regs);
        }

        Ok(Self {
            common,
            notify,
            notify_mult: l.notify_mult,
            isr,
            device,
            msix,
            num_queues: common.read_u16(common::NUM_QUEUES),
            notify_offs: core::array::from_fn(|_| Cell::new(None)),
            pending_at_open,
            acks: Cell::new(0),
            pending_seen: Cell::new(None),
            refused: Cell::new(None),
        })
    }

    /// The queue vectors pending now (bit per vector below 64).
    fn pending_queue_vectors(&self) -> u64 {
        let Some(m) = &self.msix else {
            return 0;
        };
        let mut bits = 0;
        for word in 0..u64::from(m.table_size.min(64)).div_ceil(32) {
            bits |= u64::from(m.pba.read_u32(4 * word)) << (32 * word);
        }
        let entries = if m.table_size >= 64 {
            u64::MAX
        } else {
            (1u64 << m.table_size) - 1
        };
        // Vector 0 is the configuration's (unless it is the only one).
        let queue_vectors = if m.table_size > 1 {
            entries & !1
        } else {
            entries
        };
        bits & queue_vectors
    }

    /// What the pending bits showed (call after the device was driven, before the reset).
    pub fn msix_verdict(&self) -> MsixVerdict {
        if self.msix.is_none() {
            return MsixVerdict::NoMsix;
        }
        if let Some((q, wrote, read)) = self.refused.get() {
            return MsixVerdict::Refused(q, wrote, read);
        }
        if self.pending_at_open != 0 {
            return MsixVerdict::PendingBefore(self.pending_at_open.trailing_zeros() as u16);
        }
        // Seen during the run, or set by now (the device may set it just after the used index
        // that the poll saw; and drivers that poll the used ring themselves never ask).
        let now = self.pending_queue_vectors();
        match (self.pending_seen.get(), self.acks.get()) {
            (Some(v), _) => MsixVerdict::Pending(v),
            (None, _) if now != 0 => MsixVerdict::Pending(now.trailing_zeros() as u16),
            (None, 0) => MsixVerdict::Untested,
            (None, acks) => MsixVerdict::NotPending { acks },
        }
    }

    /// Selects queue `index`.
    fn select(&self, index: u16) {
        self.common.write_u16(common::QUEUE_SELECT, index);
    }

    /// Writes a vector register and reads it back; a refusal is remembered.
    fn set_vector(&self, offset: u64, vector: u16, queue: Option<u16>) {
        self.common.write_u16(offset, vector);
        let back = self.common.read_u16(offset);
        if back != vector && self.refused.get().is_none() {
            self.refused.set(Some((queue, vector, back)));
        }
    }

    /// Queue `index`'s notify offset (selects it).
    fn read_notify_off(&self, index: u16) -> u16 {
        self.select(index);
        self.common.read_u16(common::QUEUE_NOTIFY_OFF)
    }

    /// Writes a 64-bit field as two 32-bit halves, low first.
    fn write_u64(&self, offset: u64, value: u64) {
        self.common.write_u32(offset, value as u32);
        self.common.write_u32(offset + 4, (value >> 32) as u32);
    }
}

/// Whether `vector`'s pending bit is set.
fn pending(m: &MsixRegs, vector: u16) -> bool {
    let word = u64::from(vector / 32);
    m.pba.read_u32(4 * word) & (1 << (vector % 32)) != 0
}

impl Transport for PciTransport {
    fn status(&self) -> u8 {
        self.common.read_u8(common::DEVICE_STATUS)
    }

    fn set_status(&self, status: u8) {
        self.common.write_u8(common::DEVICE_STATUS, status);
    }

    fn device_features(&self) -> u64 {
        self.common.write_u32(common::DEVICE_FEATURE_SELECT, 0);
        let low = self.common.read_u32(common::DEVICE_FEATURE);
        self.common.write_u32(common::DEVICE_FEATURE_SELECT, 1);
        let high = self.common.read_u32(common::DEVICE_FEATURE);
        u64::from(high) << 32 | u64::from(low)
    }

    fn set_driver_features(&self, features: u64) {
        self.common.write_u32(common::DRIVER_FEATURE_SELECT, 0);
        self.common
            .write_u32(common::DRIVER_FEATURE, features as u32);
        self.common.write_u32(common::DRIVER_FEATURE_SELECT, 1);
        self.common
            .write_u32(common::DRIVER_FEATURE, (features >> 32) as u32);
    }

    fn queue_max(&self, index: u16) -> u32 {
        if index >= self.num_queues {
            return 0;
        }
        self.select(index);
        u32::from(self.common.read_u16(common::QUEUE_SIZE))
    }

    fn queue_ready(&self, index: u16) -> bool {
        if index >= self.num_queues {
            return false;
        }
        self.select(index);
        self.common.read_u16(common::QUEUE_ENABLE) != 0
    }

    fn set_queue(&self, index: u16, size: u16, a: QueueAddresses) {
        if let Some(m) = &self.msix {
            // A reset (every start negotiates first) took the vectors away.
            self.set_vector(common::CONFIG_MSIX_VECTOR, CONFIG_VECTOR, None);
            self.select(index);
            self.set_vector(
                common::QUEUE_MSIX_VECTOR,
                queue_vector(index, m.table_size),
                Some(index),
            );
        }
        self.select(index);
        self.common.write_u16(common::QUEUE_SIZE, size);
        self.write_u64(common::QUEUE_DESC, a.desc);
        self.write_u64(common::QUEUE_DRIVER, a.driver);
        self.write_u64(common::QUEUE_DEVICE, a.device);
        let off = self.common.read_u16(common::QUEUE_NOTIFY_OFF);
        if let Some(cell) = self.notify_offs.get(usize::from(index)) {
            cell.set(Some(off));
        }
    }

    fn enable_queue(&self, index: u16) {
        self.select(index);
        self.common.write_u16(common::QUEUE_ENABLE, 1);
    }

    fn notify(&self, index: u16) {
        let off = match self.notify_offs.get(usize::from(index)).map(Cell::get) {
            Some(Some(off)) => off,
            _ => self.read_notify_off(index),
        };
        // Outside the notify structure the write goes nowhere (the request then times out).
        let at = u64::from(off) * u64::from(self.notify_mult);
        self.notify.write_u16(at, index);
    }

    fn ack_interrupts(&self) -> u32 {
        // Reading the ISR clears it.
        let isr = u32::from(self.isr.read_u8(0));
        self.acks.set(self.acks.get().saturating_add(1));
        if self.pending_seen.get().is_none() {
            let now = self.pending_queue_vectors();
            if now != 0 {
                self.pending_seen.set(Some(now.trailing_zeros() as u16));
            }
        }
        isr
    }

    fn config_generation(&self) -> u32 {
        u32::from(self.common.read_u8(common::CONFIG_GENERATION))
    }

    fn config_u8(&self, offset: usize) -> u8 {
        match &self.device {
            Some(d) if (offset as u64) < d.len() => d.read_u8(offset as u64),
            _ => 0,
        }
    }

    fn config_u32(&self, offset: usize) -> u32 {
        match &self.device {
            Some(d) if offset.is_multiple_of(4) && offset as u64 + 4 <= d.len() => {
                d.read_u32(offset as u64)
            }
            _ => 0,
        }
    }
}

/// A virtio device on either transport, for the checks.
pub enum AnyTransport {
    /// virtio-mmio.
    Mmio(Mmio),
    /// virtio-pci.
    Pci(PciTransport),
}

impl AnyTransport {
    /// The virtio-pci transport, if this is one.
    pub fn as_pci(&self) -> Option<&PciTransport> {
        match self {
            Self::Pci(p) => Some(p),
            Self::Mmio(_) => None,
        }
    }
}

/// Calls `$method` on whichever transport it is.
macro_rules! either {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTransport::Mmio($t) => $e,
            AnyTransport::Pci($t) => $e,
        }
    };
}

impl Transport for AnyTransport {
    fn status(&self) -> u8 {
        either!(self, t => t.status())
    }

    fn set_status(&self, status: u8) {
        either!(self, t => t.set_status(status))
    }

    fn device_features(&self) -> u64 {
        either!(self, t => t.device_features())
    }

    fn set_driver_features(&self, features: u64) {
        either!(self, t => t.set_driver_features(features))
    }

    fn queue_max(&self, index: u16) -> u32 {
        either!(self, t => t.queue_max(index))
    }

    fn queue_ready(&self, index: u16) -> bool {
        either!(self, t => t.queue_ready(index))
    }

    fn set_queue(&self, index: u16, size: u16, addresses: QueueAddresses) {
        either!(self, t => t.set_queue(index, size, addresses))
    }

    fn enable_queue(&self, index: u16) {
        either!(self, t => t.enable_queue(index))
    }

    fn notify(&self, index: u16) {
        either!(self, t => t.notify(index))
    }

    fn ack_interrupts(&self) -> u32 {
        either!(self, t => t.ack_interrupts())
    }

    fn config_generation(&self) -> u32 {
        either!(self, t => t.config_generation())
    }

    fn config_u8(&self, offset: usize) -> u8 {
        either!(self, t => t.config_u8(offset))
    }

    fn config_u32(&self, offset: usize) -> u32 {
        either!(self, t => t.config_u32(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{Bdf, ConfigSpace};

    #[test]
    fn queue_vectors() {
        // Config on 0, queues from 1 while there are entries.
        assert_eq!(queue_vector(0, 3), 1);
        assert_eq!(queue_vector(1, 3), 2);
        assert_eq!(queue_vector(2, 3), 2, "shares the last entry");
        assert_eq!(queue_vector(7, 3), 2);
        assert_eq!(queue_vector(0, 1), 0, "one entry: everything on it");
        assert_eq!(queue_vector(u16::MAX, 2048), 2047);
        assert_eq!(queue_vector(0, 0), 0);
    }

    #[test]
    fn verdicts_read_well() {
        use std::string::ToString;
        assert!(MsixVerdict::NotPending { acks: 2 }.failed());
        assert!(MsixVerdict::Refused(Some(0), 1, NO_VECTOR).failed());
        assert!(!MsixVerdict::Pending(1).failed());
        assert!(!MsixVerdict::Untested.failed());
        assert_eq!(
            MsixVerdict::Refused(Some(0), 1, NO_VECTOR).to_string(),
            "MSI-X: queue 0's queue_msix_vector reads NO_VECTOR (0xffff) after writing 1"
        );
        assert_eq!(
            MsixVerdict::Pending(1).to_string(),
            "MSI-X masked, vector 1 pending"
        );
    }

    /// Maps `len` bytes of zeroed anonymous memory at `addr` in this test process (the
    /// addresses the probe uses for ECAM and BARs), refusing to replace an existing mapping.
    fn map_fixed(addr: u64, len: u64) -> bool {
        const MMAP: i64 = 9;
        const PROT_READ_WRITE: u64 = 3;
        const MAP_PRIVATE_ANONYMOUS: u64 = 0x22;
        const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
        let ret: i64;
        // SAFETY: mmap with MAP_FIXED_NOREPLACE creates a new mapping or fails; it never
        // touches memory this process uses. The registers clobbered by `syscall` are declared.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") MMAP => ret,
                in("rdi") addr,
                in("rsi") len,
                in("rdx") PROT_READ_WRITE,
                in("r10") MAP_PRIVATE_ANONYMOUS | MAP_FIXED_NOREPLACE,
                in("r8") -1i64,
                in("r9") 0u64,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == addr as i64
    }

    fn poke(addr: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the mappings map_fixed made.
            unsafe { ((addr + i as u64) as *mut u8).write_volatile(*b) }
        }
    }

    fn peek(addr: u64, n: usize) -> std::vec::Vec<u8> {
        // SAFETY: inside the mappings map_fixed made.
        (0..n)
            .map(|i| unsafe { ((addr + i as u64) as *const u8).read_volatile() })
            .collect()
    }

    fn peek32(addr: u64) -> u32 {
        let b = peek(addr, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn peek16(addr: u64) -> u16 {
        let b = peek(addr, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    const ECAM: u64 = 0xe000_0000;
    const BAR: u64 = 0xd000_0000;
    /// 00:01.0's configuration space in ECAM.
    const CFG: u64 = ECAM + 0x8000;

    /// A virtio capability at `at` (configuration offset), next `next`.
    fn cap(at: u64, next: u8, cfg_type: u8, offset: u32, length: u32, mult: Option<u32>) {
        let mut c = std::vec![
            0x09,
            next,
            if mult.is_some() { 20 } else { 16 },
            cfg_type,
            0,
            0,
            0,
            0
        ];
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(&length.to_le_bytes());
        if let Some(m) = mult {
            c.extend_from_slice(&m.to_le_bytes());
        }
        poke(CFG + at, &c);
    }

    /// cgvm's virtio-blk layout: common 0x0, ISR 0x1000, device 0x2000, notify 0x3000 (×4),
    /// MSI-X table 0x4000 (3 entries), PBA 0x5000; BAR0 64-bit at 0xd0000000.
    fn build_function() {
        poke(CFG, &[0xf4, 0x1a, 0x42, 0x10]);
        poke(CFG + 0x04, &[0, 0, 0x10, 0]); // command 0, status: capability list
        poke(CFG + 0x08, &[1]);
        poke(CFG + 0x10, &0xd000_0004u32.to_le_bytes());
        poke(CFG + 0x34, &[0x40]);
        poke(CFG + 0x40, &[0x11, 0x4c, 2, 0]);
        poke(CFG + 0x44, &0x4000u32.to_le_bytes());
        poke(CFG + 0x48, &0x5000u32.to_le_bytes());
        cap(0x4c, 0x5c, 1, 0, 0x38, None);
        cap(0x5c, 0x6c, 3, 0x1000, 1, None);
        cap(0x6c, 0x80, 2, 0x3000, 0x1000, Some(4));
        cap(0x80, 0, 4, 0x2000, 0x100, None);
        poke(BAR + common::NUM_QUEUES, &2u16.to_le_bytes());
    }

    /// The transport against plain memory at the probe's addresses: what it writes where.
    /// (Memory is no device: it reads back what was written, selectors select nothing.)
    #[test]
    fn transport_registers_in_memory() {
        assert!(
            map_fixed(ECAM, 1 << 20),
            "cannot map 0xe0000000 for the test"
        );
        assert!(map_fixed(BAR, 0x8000), "cannot map 0xd0000000 for the test");
        build_function();
        let ecam = Ecam::new(ECAM, 0, 0).unwrap_or_else(|| unreachable!());
        let bdf = Bdf::new(0, 1, 0).unwrap_or_else(|| unreachable!());
        let f = VirtioFunction::parse(bdf, &ConfigSpace::read(&ecam, bdf))
            .unwrap_or_else(|| panic!("not virtio"))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = PciTransport::open(&ecam, &f).unwrap_or_else(|e| panic!("{e}"));

        // Memory decode, bus master, INTx disable; MSI-X enabled and masked; the table.
        assert_eq!(peek16(CFG + 4), 0x0406);
        assert_eq!(peek16(CFG + 0x42), 0xc002);
        for k in 0..3u64 {
            let e = BAR + 0x4000 + 16 * k;
            assert_eq!(
                [peek32(e), peek32(e + 4), peek32(e + 8), peek32(e + 12)],
                [0xfee0_0000, 0, 0x40 + k as u32, 0]
            );
        }
        assert_eq!(t.msix_verdict(), MsixVerdict::Untested);

        // Features: select, then the 32 bits; low half first.
        poke(BAR + common::DEVICE_FEATURE, &1u32.to_le_bytes());
        assert_eq!(t.device_features(), 0x1_0000_0001);
        t.set_driver_features(0x1_0000_0206);
        assert_eq!(peek32(BAR + common::DRIVER_FEATURE_SELECT), 1);
        assert_eq!(
            peek32(BAR + common::DRIVER_FEATURE),
            1,
            "the high half, written last"
        );
        t.set_status(0x0b);
        assert_eq!(peek(BAR + common::DEVICE_STATUS, 1), [0x0b]);
        assert_eq!(t.status(), 0x0b);

        // Queues: none past num_queues; queue 1 with its vector, addresses and notify offset.
        assert_eq!(t.queue_max(2), 0);
        assert!(!t.queue_ready(2));
        poke(BAR + common::QUEUE_NOTIFY_OFF, &5u16.to_le_bytes());
        let a = QueueAddresses {
            desc: 0x1234_5678_9abc_def0,
            driver: 0x10_0000,
            device: 0x20_0000,
        };
        t.set_queue(1, 8, a);
        assert_eq!(peek16(BAR + common::CONFIG_MSIX_VECTOR), CONFIG_VECTOR);
        assert_eq!(peek16(BAR + common::QUEUE_MSIX_VECTOR), 2);
        assert_eq!(peek16(BAR + common::QUEUE_SELECT), 1);
        assert_eq!(peek16(BAR + common::QUEUE_SIZE), 8);
        assert_eq!(peek32(BAR + common::QUEUE_DESC), 0x9abc_def0);
        assert_eq!(peek32(BAR + common::QUEUE_DESC + 4), 0x1234_5678);
        assert_eq!(peek32(BAR + common::QUEUE_DRIVER), 0x10_0000);
        assert_eq!(peek32(BAR + common::QUEUE_DEVICE), 0x20_0000);
        t.enable_queue(1);
        assert_eq!(peek16(BAR + common::QUEUE_ENABLE), 1);
        assert!(t.queue_ready(1));
        // The notify offset was read at set-up: 0x3000 + 5 * 4 gets the queue index.
        poke(BAR + common::QUEUE_NOTIFY_OFF, &0u16.to_le_bytes());
        t.notify(1);
        assert_eq!(peek16(BAR + 0x3014), 1);
        assert_eq!(peek16(BAR + 0x3000), 0);

        // Device configuration: inside DEVICE_CFG only, aligned.
        poke(
            BAR + 0x2000,
            &[0x00, 0x00, 0x02, 0x00, 0xaa, 0xbb, 0xcc, 0xdd],
        );
        assert_eq!(t.config_u32(0), 0x0002_0000);
        assert_eq!(t.config_u8(5), 0xbb);
        assert_eq!(t.config_u32(2), 0, "unaligned");
        assert_eq!(t.config_u32(0xfc), 0);
        assert_eq!(t.config_u32(0x100), 0, "past DEVICE_CFG");
        assert_eq!(t.config_u8(0x100), 0);
        poke(BAR + common::CONFIG_GENERATION, &[7]);
        assert_eq!(t.config_generation(), 7);

        // The PBA: nothing pending after a used buffer fails; the configuration vector (0)
        // does not count; a queue vector does.
        poke(BAR + 0x1000, &[1]);
        assert_eq!(t.ack_interrupts(), 1);
        assert_eq!(t.msix_verdict(), MsixVerdict::NotPending { acks: 1 });
        poke(BAR + 0x5000, &[0b001]);
        assert_eq!(t.msix_verdict(), MsixVerdict::NotPending { acks: 1 });
        poke(BAR + 0x5000, &[0b101]);
        assert_eq!(t.msix_verdict(), MsixVerdict::Pending(2));
        t.ack_interrupts();
        poke(BAR + 0x5000, &[0]);
        assert_eq!(
            t.msix_verdict(),
            MsixVerdict::Pending(2),
            "seen during the run"
        );

        // Opened again with a queue vector pending: proves nothing.
        poke(BAR + 0x5000, &[0b010]);
        let again = PciTransport::open(&ecam, &f).unwrap_or_else(|e| panic!("{e}"));
        again.ack_interrupts();
        assert_eq!(again.msix_verdict(), MsixVerdict::PendingBefore(1));

        // A command register that keeps memory decode off cannot be driven: here the write
        // is taken, so break the structure instead: COMMON_CFG too short.
        let mut short = f;
        short.layout.common.length = 0x20;
        assert!(matches!(
            PciTransport::open(&ecam, &short),
            Err(OpenError::Region {
                what: "COMMON_CFG",
                addr: Some(0xd000_0000),
                length: 0x20,
                need: 0x38
            })
        ));
        let mut high = f;
        high.bars[0] = crate::pci::Bar::Mem64 {
            base: 0x1_0000_0000,
            prefetchable: false,
        };
        assert!(matches!(
            PciTransport::open(&ecam, &high),
            Err(OpenError::Region {
                addr: Some(0x1_0000_0000),
                ..
            })
        ));
    }
}
