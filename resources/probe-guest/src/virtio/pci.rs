//! The virtio-pci transport (virtio 1.2, 4.1, modern devices only): the driver core's
//! [`Transport`] over a function's common configuration, notification, ISR and device
//! configuration structures (found by `pci`), and [`AnyTransport`], which is either this or
//! virtio-mmio, for the checks.
//!
//! The queues are always polled, as on virtio-mmio. How the function's interrupts are set up,
//! and what is checked of them, is `probe.pci_irq` ([`PciIrq`]); [`PciTransport::open`] turns on
//! memory decode and bus mastering, then:
//!
//! - `msix-masked` (the default): INTx disabled; every MSI-X table entry written (the local
//!   APIC's address, vector 0x40 + entry, the entry itself unmasked), then MSI-X enabled with
//!   the function mask set, so no message can leave the device. When a queue is set up, the
//!   configuration vector becomes 0 and queue `i` gets vector [`queue_vector`] (read back:
//!   NO_VECTOR means the device refused it). A masked vector the device signals sets its bit in
//!   the pending bit array (PBA) instead, which [`PciTransport::ack_interrupts`] watches: after
//!   the device used a buffer the bit of a queue's vector must be set
//!   ([`PciTransport::irq_verdict`]), which shows that the device signals through MSI-X and
//!   respects the mask. The ISR is read (and so cleared) as well: with MSI-X enabled a device
//!   need not set it.
//! - `intx`: MSI-X disabled, INTx enabled (command bit 10 clear); the interrupt pin register
//!   must say INTA (1) and the interrupt line a GSI in [`INTX_GSIS`] (the IOAPIC pins a PC
//!   gives PCI). Every vector register is set to NO_VECTOR (and must read back so). After a
//!   used buffer the ISR must have its queue bit (bit 0), and the read right after it must
//!   give 0 (a read clears it); the PBA must stay empty.
//! - `msix`: as `msix-masked`, the entries naming the local APIC's own ID, but the function
//!   mask clear, the local APIC enabled in software and interrupts on (`crate::irq`): after a
//!   used buffer the interrupt of a queue's vector must arrive (its count goes up).
//! - `intx-ioapic`: as `intx`, with the local APIC enabled, the IOAPIC's redirection entry of
//!   the GSI set to vector [`INTX_VECTOR`], level-triggered, to this CPU, and interrupts on;
//!   the ring-0 handler reads the ISR (which lets the level-triggered line drop) before its
//!   EOI, as a driver's handler does: after a used buffer the interrupt must arrive and its
//!   handler must have read the queue bit.
//!
//! In the two last modes the interrupts are turned off again, and the MSI-X function mask set
//! or the IOAPIC entry masked, when the transport is dropped (the local APIC stays enabled:
//! with interrupts off nothing reaches the CPU).
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
use core::ops::RangeInclusive;

use super::{Mmio, QueueAddresses, Transport};
use crate::cmdline::PciIrq;
use crate::irq;
use crate::mmio::Regs;
use crate::pci::{
    self, Bdf, ConfigAccess, Ecam, VirtioFunction, COMMAND, COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE, COMMAND_MEMORY, MSIX_ENABLE, MSIX_ENTRY_LEN, MSIX_FUNCTION_MASK,
};
use crate::tsc::Deadline;

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
/// The first interrupt vector a table entry names (entry k: this + k).
pub const MSI_FIRST_VECTOR: u8 = 0x40;
/// The interrupt vector the IOAPIC entry of INTx names (`intx-ioapic`).
pub const INTX_VECTOR: u8 = 0x80;
/// The GSIs a function's interrupt line may name: the IOAPIC pins above the ISA ones.
pub const INTX_GSIS: RangeInclusive<u8> = 16..=23;
/// The interrupt pin register's INTA.
pub const INTX_PIN_A: u8 = 1;
/// Table entries written at most (the rest keep what they hold: the function mask covers
/// them all).
const MAX_TABLE_WRITES: u16 = 64;
/// Queues whose notify offset is remembered (others are read at each notification).
const CACHED_QUEUES: usize = 8;
/// How long the verdict waits for an ISR bit or an interrupt that a used buffer announced but
/// that has not come yet, ms.
const LATE_MS: u64 = 500;
/// The ISR's queue bit.
const ISR_QUEUE: u8 = 1;

/// The MSI-X vector of queue `index` on a table of `table_size` entries: vector 0 is the
/// configuration's, queue i gets 1 + i while there are entries, the last entry after that
/// (a table of one entry: everything on 0).
pub fn queue_vector(index: u16, table_size: u16) -> u16 {
    index.saturating_add(1).min(table_size.saturating_sub(1))
}

/// The entries of a table of `table_size`, as bits (entries below 64).
fn all_entries(table_size: u16) -> u64 {
    if table_size >= 64 {
        u64::MAX
    } else {
        (1u64 << table_size) - 1
    }
}

/// The entries of a table of `table_size` that queues use, as bits (entries below 64): all
/// but entry 0, the configuration's, unless it is the only one.
fn queue_entries(table_size: u16) -> u64 {
    let entries = all_entries(table_size);
    if table_size > 1 {
        entries & !1
    } else {
        entries
    }
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
    /// The command register did not take memory decode and bus mastering (or, for INTx,
    /// the INTx disable bit's clearing).
    Command(u16),
    /// Message control did not read back with MSI-X enabled and masked.
    Msix(u16),
    /// Message control did not read back as written (the bits the driver sets or clears).
    MsixControl {
        /// Written.
        wrote: u16,
        /// Read back.
        read: u16,
    },
    /// `probe.pci_irq=msix` on a function without an MSI-X capability.
    NoMsix,
    /// The interrupt pin register does not say INTA.
    IntxPin(u8),
    /// The interrupt line register names no GSI in [`INTX_GSIS`].
    IntxLine(u8),
    /// The local APIC's spurious-interrupt vector register does not read back enabled.
    Lapic(u32),
    /// The IOAPIC has no entry for the GSI.
    IoapicEntries {
        /// The GSI.
        gsi: u8,
        /// The entries it has.
        entries: u32,
    },
    /// The IOAPIC redirection entry did not read back as written.
    Ioapic {
        /// The GSI.
        gsi: u8,
        /// Written.
        wrote: u64,
        /// Read back.
        read: u64,
    },
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
            Self::MsixControl { wrote, read } => write!(
                f,
                "MSI-X message control reads 0x{read:04x} after writing 0x{wrote:04x}"
            ),
            Self::NoMsix => write!(f, "no MSI-X capability (probe.pci_irq=msix)"),
            Self::IntxPin(p) => write!(
                f,
                "interrupt pin register reads {p} (expected {INTX_PIN_A}, INTA)"
            ),
            Self::IntxLine(l) => write!(
                f,
                "interrupt line register reads {l} (expected a GSI in {}..={})",
                INTX_GSIS.start(),
                INTX_GSIS.end()
            ),
            Self::Lapic(svr) => write!(
                f,
                "local APIC SVR reads 0x{svr:x} after the software enable (bit 8)"
            ),
            Self::IoapicEntries { gsi, entries } => {
                write!(
                    f,
                    "the IOAPIC has {entries} redirection entries, none for GSI {gsi}"
                )
            }
            Self::Ioapic { gsi, wrote, read } => write!(
                f,
                "IOAPIC redirection entry {gsi} reads 0x{read:016x} after writing 0x{wrote:016x}"
            ),
        }
    }
}

/// The MSI-X state of an open function.
#[derive(Debug, Clone, Copy)]
struct MsixRegs {
    table_size: u16,
    pba: Regs,
    /// The capability's offset in configuration space.
    at: u16,
}

/// What the interrupt watch showed while the device was driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqVerdict {
    /// msix-masked: the function has no MSI-X capability (the ISR is polled alone).
    NoMsix,
    /// No used buffer was acknowledged (a driver that polls its used rings itself does not
    /// say), and nothing was seen: the mode, and the GSI (INTx).
    Untested(PciIrq, u8),
    /// msix-masked: a queue vector was pending already when the function was opened (left
    /// from an earlier driver): nothing proven.
    PendingBefore(u16),
    /// msix-masked: after a used buffer this queue vector was pending: the device signalled
    /// it, masked.
    Pending(u16),
    /// The device refused a vector: queue (or `None` for the configuration), vector written,
    /// value read back.
    Refused(Option<u16>, u16, u16),
    /// msix-masked: used buffers were acknowledged, and no queue vector is pending.
    NotPending {
        /// Used-buffer acknowledgements seen.
        acks: u32,
    },
    /// intx: after a used buffer the ISR read this (queue bit set), the read after it 0.
    Isr {
        /// The GSI (interrupt line).
        gsi: u8,
        /// The ISR.
        isr: u8,
    },
    /// intx: used buffers were acknowledged, and the ISR's queue bit never came.
    IsrNotSet {
        /// Used-buffer acknowledgements seen.
        acks: u32,
    },
    /// intx: the read after the one with the queue bit did not give 0.
    IsrNotCleared {
        /// The first read.
        first: u8,
        /// The read after it.
        second: u8,
    },
    /// intx: a vector is pending in the PBA although MSI-X is disabled.
    PbaWithoutMsix(u16),
    /// msix: the interrupt of this queue vector arrived.
    Delivered {
        /// The table entry (virtio vector).
        entry: u16,
        /// The CPU's interrupt vector.
        vector: u8,
        /// Interrupts taken on the queue vectors.
        taken: u32,
    },
    /// msix: used buffers were acknowledged, and no queue vector's interrupt arrived.
    NotDelivered {
        /// Used-buffer acknowledgements seen.
        acks: u32,
        /// The queue vectors pending in the PBA (bit per vector below 64).
        pending: u64,
    },
    /// intx-ioapic: the interrupt arrived, and its handler read the ISR's queue bit.
    IntxDelivered {
        /// The GSI.
        gsi: u8,
        /// The CPU's interrupt vector.
        vector: u8,
        /// Interrupts taken.
        taken: u32,
        /// How many of them found the ISR 0 (no cause left: the line was raised again after
        /// the cause had been read).
        empty: u32,
        /// What the handler's ISR reads gave, ORed.
        isr: u8,
    },
    /// intx-ioapic: used buffers were acknowledged, and the interrupt did not arrive (or its
    /// handler never read the queue bit).
    IntxNotDelivered {
        /// The GSI.
        gsi: u8,
        /// Used-buffer acknowledgements seen.
        acks: u32,
        /// Interrupts taken.
        taken: u32,
        /// What the handler's ISR reads gave, ORed.
        isr: u8,
        /// The ISR read from ring 3 at the end (clearing it).
        isr_now: u8,
    },
}

impl fmt::Display for IrqVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoMsix => write!(f, "no MSI-X"),
            Self::Untested(mode, gsi) => match mode {
                PciIrq::MsixMasked => write!(f, "MSI-X masked"),
                PciIrq::Msix => write!(f, "MSI-X unmasked"),
                PciIrq::Intx => write!(f, "INTx GSI {gsi}"),
                PciIrq::IntxIoapic => write!(f, "INTx GSI {gsi} through the IOAPIC"),
            },
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
                if wrote == NO_VECTOR {
                    write!(f, " after writing NO_VECTOR (0xffff)")
                } else {
                    write!(f, " after writing {wrote}")
                }
            }
            Self::NotPending { acks } => write!(
                f,
                "MSI-X: the device used buffers ({acks} polls found them) but no queue vector is \
                 pending in the PBA: with the function masked, a used buffer must set its \
                 vector's pending bit"
            ),
            Self::Isr { gsi, isr } => write!(f, "INTx GSI {gsi}, ISR 0x{isr:x}"),
            Self::IsrNotSet { acks } => write!(
                f,
                "INTx: the device used buffers ({acks} polls found them) but the ISR's queue bit \
                 (0x1) did not come within {LATE_MS} ms"
            ),
            Self::IsrNotCleared { first, second } => write!(
                f,
                "INTx: the ISR read 0x{first:x}, then 0x{second:x}: a read must clear it"
            ),
            Self::PbaWithoutMsix(v) => write!(
                f,
                "INTx: vector {v} is pending in the PBA with MSI-X disabled"
            ),
            Self::Delivered {
                entry,
                vector,
                taken,
            } => write!(
                f,
                "MSI-X vector {entry} delivered as interrupt 0x{vector:x}, {taken} taken"
            ),
            Self::NotDelivered { acks, pending } => {
                write!(
                    f,
                    "MSI-X: the device used buffers ({acks} polls found them) but no queue \
                     vector's interrupt (0x{:x}..) arrived within {LATE_MS} ms; ",
                    MSI_FIRST_VECTOR + 1
                )?;
                if pending == 0 {
                    write!(f, "nothing is pending in the PBA")
                } else {
                    write!(
                        f,
                        "vector {} is pending in the PBA (held back as if masked)",
                        pending.trailing_zeros()
                    )
                }
            }
            Self::IntxDelivered {
                gsi,
                vector,
                taken,
                empty,
                isr,
            } => write!(
                f,
                "INTx GSI {gsi} delivered through the IOAPIC as interrupt 0x{vector:x}, {taken} \
                 taken ({empty} found the ISR 0), ISR 0x{isr:x}"
            ),
            Self::IntxNotDelivered {
                gsi,
                acks,
                taken,
                isr,
                isr_now,
            } => {
                write!(
                    f,
                    "INTx GSI {gsi}: the device used buffers ({acks} polls found them) but "
                )?;
                if taken == 0 {
                    write!(
                        f,
                        "interrupt 0x{INTX_VECTOR:x} did not arrive within {LATE_MS} ms"
                    )?;
                } else {
                    write!(
                        f,
                        "interrupt 0x{INTX_VECTOR:x} came {taken} times and its handler read \
                         the ISR as 0x{isr:x}, never with the queue bit"
                    )?;
                }
                write!(f, " (the ISR reads 0x{isr_now:x} now)")
            }
        }
    }
}

impl IrqVerdict {
    /// Whether this is a problem.
    pub fn failed(&self) -> bool {
        matches!(
            self,
            Self::Refused(..)
                | Self::NotPending { .. }
                | Self::IsrNotSet { .. }
                | Self::IsrNotCleared { .. }
                | Self::PbaWithoutMsix(_)
                | Self::NotDelivered { .. }
                | Self::IntxNotDelivered { .. }
        )
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
    /// How interrupts are taken.
    mode: PciIrq,
    /// The interrupt line (INTx modes; 0 otherwise).
    gsi: u8,
    /// Configuration space, for undoing the delivered modes' setup on drop.
    ecam: Ecam,
    bdf: Bdf,
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
    /// intx: the first ISR read with the queue bit, and the read right after it.
    isr_seen: Cell<Option<(u8, u8)>>,
    /// intx-ioapic: what the handler's ISR reads gave, ORed.
    handler_isr: Cell<u8>,
}

impl PciTransport {
    /// Opens `f` (configuration space through `ecam`) as the module docs say for `mode`:
    /// memory decode and bus mastering on, interrupts set up. Nothing of the virtio device is
    /// touched.
    pub fn open(ecam: &Ecam, f: &VirtioFunction, mode: PciIrq) -> Result<Self, OpenError> {
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
            None if mode == PciIrq::Msix => return Err(OpenError::NoMsix),
            None => None,
        };
        let gsi = if mode.intx() {
            if f.interrupt_pin != INTX_PIN_A {
                return Err(OpenError::IntxPin(f.interrupt_pin));
            }
            if !INTX_GSIS.contains(&f.interrupt_line) {
                return Err(OpenError::IntxLine(f.interrupt_line));
            }
            f.interrupt_line
        } else {
            0
        };

        let bdf = f.bdf;
        let dword = ecam.read_u32(bdf, COMMAND) & 0xffff;
        let on = COMMAND_MEMORY | COMMAND_BUS_MASTER;
        let command = if mode.intx() {
            (dword as u16 | on) & !COMMAND_INTX_DISABLE
        } else {
            dword as u16 | on | COMMAND_INTX_DISABLE
        };
        // The status half written as 0: its bits are write-1-to-clear.
        ecam.write_u32(bdf, COMMAND, u32::from(command));
        let back = ecam.read_u32(bdf, COMMAND) as u16;
        let mut must = on;
        if mode.intx() {
            must |= COMMAND_INTX_DISABLE;
        }
        if back & must != command & must {
            return Err(OpenError::Command(back));
        }

        // The local APIC's ID names this CPU in the messages and the IOAPIC entry.
        let apic_id = if mode.delivered() {
            let id = irq::lapic_enable();
            let svr = irq::lapic_svr();
            if svr & 1 << 8 == 0 {
                return Err(OpenError::Lapic(svr));
            }
            id
        } else {
            0
        };

        let mut msix = None;
        let mut pending_at_open = 0;
        if let Some((m, table, pba)) = msix_regions {
            let at = u16::from(m.at);
            let cap = ecam.read_u32(bdf, at);
            let old = (cap >> 16) as u16;
            let write_control = |control: u16| {
                ecam.write_u32(bdf, at, (cap & 0xffff) | u32::from(control) << 16);
                (ecam.read_u32(bdf, at) >> 16) as u16
            };
            if mode.intx() {
                let control = old & !MSIX_ENABLE;
                let back = write_control(control);
                if back & MSIX_ENABLE != 0 {
                    return Err(OpenError::MsixControl {
                        wrote: control,
                        read: back,
                    });
                }
            } else {
                for k in 0..m.table_size.min(MAX_TABLE_WRITES) {
                    let e = u64::from(k) * MSIX_ENTRY_LEN;
                    table.write_u32(e, irq::msi_address(apic_id));
                    table.write_u32(e + 4, 0);
                    table.write_u32(e + 8, irq::msi_data(MSI_FIRST_VECTOR + k as u8));
                    table.write_u32(e + 12, 0);
                }
                let both = MSIX_ENABLE | MSIX_FUNCTION_MASK;
                let back = write_control(old | both);
                if back & both != both {
                    return Err(OpenError::Msix(back));
                }
            }
            let regs = MsixRegs {
                table_size: m.table_size,
                pba,
                at,
            };
            pending_at_open = (1..m.table_size.min(64))
                .filter(|&v| pending(&regs, v))
                .fold(0u64, |acc, v| acc | 1 << v);
            msix = Some(regs);
        }

        // The counts of the vectors watched start from 0 (interrupts are still off).
        match mode {
            PciIrq::Msix => {
                for k in 0..MAX_TABLE_WRITES {
                    irq::reset_count(MSI_FIRST_VECTOR + k as u8);
                }
            }
            PciIrq::IntxIoapic => {
                let entries = irq::ioapic_entries();
                if u32::from(gsi) >= entries {
                    return Err(OpenError::IoapicEntries { gsi, entries });
                }
                irq::reset_count(INTX_VECTOR);
                irq::set_ack(INTX_VECTOR, isr.base());
                let want = irq::redirection_entry(INTX_VECTOR, apic_id, true, false);
                let read = irq::ioapic_set(gsi, want);
                if !irq::redirection_matches(read, want) {
                    irq::ioapic_mask(gsi);
                    irq::clear_ack();
                    return Err(OpenError::Ioapic {
                        gsi,
                        wrote: want,
                        read,
                    });
                }
            }
            PciIrq::MsixMasked | PciIrq::Intx => {}
        }

        let t = Self {
            common,
            notify,
            notify_mult: l.notify_mult,
            isr,
            device,
            msix,
            mode,
            gsi,
            ecam: *ecam,
            bdf,
            num_queues: common.read_u16(common::NUM_QUEUES),
            notify_offs: core::array::from_fn(|_| Cell::new(None)),
            pending_at_open,
            acks: Cell::new(0),
            pending_seen: Cell::new(None),
            refused: Cell::new(None),
            isr_seen: Cell::new(None),
            handler_isr: Cell::new(0),
        };
        if mode == PciIrq::Msix {
            // Unmasked last, once the vectors are counted: from here messages are sent.
            if let Some(m) = &t.msix {
                t.set_function_mask(m, false);
            }
        }
        if mode.delivered() {
            irq::enable();
        }
        Ok(t)
    }

    /// Sets or clears the MSI-X function mask.
    fn set_function_mask(&self, m: &MsixRegs, masked: bool) {
        let cap = self.ecam.read_u32(self.bdf, m.at);
        let mut control = (cap >> 16) as u16;
        if masked {
            control |= MSIX_FUNCTION_MASK;
        } else {
            control &= !MSIX_FUNCTION_MASK;
        }
        self.ecam
            .write_u32(self.bdf, m.at, (cap & 0xffff) | u32::from(control) << 16);
    }

    /// The vectors pending now, the configuration's included (bit per vector below 64).
    fn pba_bits(&self) -> u64 {
        let Some(m) = &self.msix else {
            return 0;
        };
        let mut bits = 0;
        for word in 0..u64::from(m.table_size.min(64)).div_ceil(32) {
            bits |= u64::from(m.pba.read_u32(4 * word)) << (32 * word);
        }
        bits & all_entries(m.table_size)
    }

    /// The queue vectors pending now (bit per vector below 64).
    fn pending_queue_vectors(&self) -> u64 {
        match &self.msix {
            Some(m) => self.pba_bits() & queue_entries(m.table_size),
            None => 0,
        }
    }

    /// What the interrupt watch showed (call after the device was driven, before the reset).
    pub fn irq_verdict(&self) -> IrqVerdict {
        if let Some((q, wrote, read)) = self.refused.get() {
            return IrqVerdict::Refused(q, wrote, read);
        }
        match self.mode {
            PciIrq::MsixMasked => self.masked_verdict(),
            PciIrq::Intx => self.intx_verdict(),
            PciIrq::Msix => self.msix_verdict(),
            PciIrq::IntxIoapic => self.intx_ioapic_verdict(),
        }
    }

    fn masked_verdict(&self) -> IrqVerdict {
        if self.msix.is_none() {
            return IrqVerdict::NoMsix;
        }
        if self.pending_at_open != 0 {
            return IrqVerdict::PendingBefore(self.pending_at_open.trailing_zeros() as u16);
        }
        // Seen during the run, or set by now (the device may set it just after the used index
        // that the poll saw; and drivers that poll the used ring themselves never ask).
        let now = self.pending_queue_vectors();
        match (self.pending_seen.get(), self.acks.get()) {
            (Some(v), _) => IrqVerdict::Pending(v),
            (None, _) if now != 0 => IrqVerdict::Pending(now.trailing_zeros() as u16),
            (None, 0) => IrqVerdict::Untested(self.mode, self.gsi),
            (None, acks) => IrqVerdict::NotPending { acks },
        }
    }

    fn intx_verdict(&self) -> IrqVerdict {
        let pba = self.pba_bits();
        if pba != 0 {
            return IrqVerdict::PbaWithoutMsix(pba.trailing_zeros() as u16);
        }
        let acks = self.acks.get();
        let seen = match self.isr_seen.get() {
            Some(s) => Some(s),
            None if acks == 0 => return IrqVerdict::Untested(self.mode, self.gsi),
            // The bit may come just after the used index the poll saw.
            None => {
                let deadline = Deadline::after_ms(LATE_MS);
                loop {
                    let first = self.isr.read_u8(0);
                    if first & ISR_QUEUE != 0 {
                        break Some((first, self.isr.read_u8(0)));
                    }
                    if deadline.expired() {
                        break None;
                    }
                    core::hint::spin_loop();
                }
            }
        };
        match seen {
            Some((first, 0)) => IrqVerdict::Isr {
                gsi: self.gsi,
                isr: first,
            },
            Some((first, second)) => IrqVerdict::IsrNotCleared { first, second },
            None => IrqVerdict::IsrNotSet { acks },
        }
    }

    /// Interrupts taken on the queue vectors since the open, and the first entry that had one.
    fn msix_taken(&self) -> (u32, Option<u16>) {
        let Some(m) = &self.msix else {
            return (0, None);
        };
        let entries = queue_entries(m.table_size);
        let mut taken = 0u32;
        let mut first = None;
        for k in 0..m.table_size.min(MAX_TABLE_WRITES) {
            if entries & 1 << k == 0 {
                continue;
            }
            let n = irq::count(MSI_FIRST_VECTOR + k as u8);
            if n != 0 && first.is_none() {
                first = Some(k);
            }
            taken = taken.saturating_add(n);
        }
        (taken, first)
    }

    fn msix_verdict(&self) -> IrqVerdict {
        let acks = self.acks.get();
        let deadline = Deadline::after_ms(LATE_MS);
        loop {
            let (taken, first) = self.msix_taken();
            if let Some(entry) = first {
                return IrqVerdict::Delivered {
                    entry,
                    vector: MSI_FIRST_VECTOR + entry as u8,
                    taken,
                };
            }
            if acks == 0 {
                return IrqVerdict::Untested(self.mode, self.gsi);
            }
            if deadline.expired() {
                return IrqVerdict::NotDelivered {
                    acks,
                    pending: self.pending_queue_vectors(),
                };
            }
            core::hint::spin_loop();
        }
    }

    fn intx_ioapic_verdict(&self) -> IrqVerdict {
        let pba = self.pba_bits();
        if pba != 0 {
            return IrqVerdict::PbaWithoutMsix(pba.trailing_zeros() as u16);
        }
        let acks = self.acks.get();
        let deadline = Deadline::after_ms(LATE_MS);
        loop {
            let taken = irq::count(INTX_VECTOR);
            let isr = self.handler_isr.get() | irq::take_ack_bits() as u8;
            self.handler_isr.set(isr);
            if taken != 0 && isr & ISR_QUEUE != 0 {
                return IrqVerdict::IntxDelivered {
                    gsi: self.gsi,
                    vector: INTX_VECTOR,
                    taken,
                    empty: irq::ack_empty(),
                    isr,
                };
            }
            if acks == 0 && taken == 0 {
                return IrqVerdict::Untested(self.mode, self.gsi);
            }
            if deadline.expired() {
                return IrqVerdict::IntxNotDelivered {
                    gsi: self.gsi,
                    acks,
                    taken,
                    isr,
                    isr_now: self.isr.read_u8(0),
                };
            }
            core::hint::spin_loop();
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

impl Drop for PciTransport {
    /// Undoes what the delivered modes set up: interrupts off, then the function masked again
    /// (msix) or the IOAPIC entry masked and the handler's ISR read stopped (intx-ioapic).
    fn drop(&mut self) {
        match self.mode {
            PciIrq::Msix => {
                irq::disable();
                if let Some(m) = &self.msix {
                    self.set_function_mask(m, true);
                }
            }
            PciIrq::IntxIoapic => {
                irq::disable();
                irq::ioapic_mask(self.gsi);
                irq::clear_ack();
            }
            PciIrq::MsixMasked | PciIrq::Intx => {}
        }
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
        // A reset (every start negotiates first) took the vectors away.
        let vectors = match &self.msix {
            _ if self.mode.intx() => Some((NO_VECTOR, NO_VECTOR)),
            Some(m) => Some((CONFIG_VECTOR, queue_vector(index, m.table_size))),
            None => None,
        };
        if let Some((config, queue)) = vectors {
            self.set_vector(common::CONFIG_MSIX_VECTOR, config, None);
            self.select(index);
            self.set_vector(common::QUEUE_MSIX_VECTOR, queue, Some(index));
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
        self.acks.set(self.acks.get().saturating_add(1));
        match self.mode {
            // The handler reads the ISR; what it read is the answer.
            PciIrq::IntxIoapic => {
                let bits = irq::take_ack_bits() as u8;
                self.handler_isr.set(self.handler_isr.get() | bits);
                u32::from(bits)
            }
            PciIrq::Intx => {
                // Reading the ISR clears it: the first read with the queue bit is followed by
                // one more, which must give 0 (what it gives is not lost).
                let first = self.isr.read_u8(0);
                if first & ISR_QUEUE == 0 || self.isr_seen.get().is_some() {
                    return u32::from(first);
                }
                let second = self.isr.read_u8(0);
                self.isr_seen.set(Some((first, second)));
                u32::from(first | second)
            }
            PciIrq::MsixMasked | PciIrq::Msix => {
                // Reading the ISR clears it.
                let isr = u32::from(self.isr.read_u8(0));
                if self.mode == PciIrq::MsixMasked && self.pending_seen.get().is_none() {
                    let now = self.pending_queue_vectors();
                    if now != 0 {
                        self.pending_seen.set(Some(now.trailing_zeros() as u16));
                    }
                }
                isr
            }
        }
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
        assert!(IrqVerdict::NotPending { acks: 2 }.failed());
        assert!(IrqVerdict::Refused(Some(0), 1, NO_VECTOR).failed());
        assert!(!IrqVerdict::Pending(1).failed());
        assert!(!IrqVerdict::Untested(PciIrq::MsixMasked, 0).failed());
        assert_eq!(
            IrqVerdict::Refused(Some(0), 1, NO_VECTOR).to_string(),
            "MSI-X: queue 0's queue_msix_vector reads NO_VECTOR (0xffff) after writing 1"
        );
        assert_eq!(
            IrqVerdict::Pending(1).to_string(),
            "MSI-X masked, vector 1 pending"
        );
    }

    #[test]
    fn interrupt_verdicts_read_well() {
        use std::string::ToString;
        let ok = [
            (IrqVerdict::Untested(PciIrq::MsixMasked, 0), "MSI-X masked"),
            (IrqVerdict::Untested(PciIrq::Msix, 0), "MSI-X unmasked"),
            (IrqVerdict::Untested(PciIrq::Intx, 17), "INTx GSI 17"),
            (
                IrqVerdict::Untested(PciIrq::IntxIoapic, 18),
                "INTx GSI 18 through the IOAPIC",
            ),
            (IrqVerdict::Isr { gsi: 19, isr: 1 }, "INTx GSI 19, ISR 0x1"),
            (
                IrqVerdict::Delivered {
                    entry: 1,
                    vector: 0x41,
                    taken: 5,
                },
                "MSI-X vector 1 delivered as interrupt 0x41, 5 taken",
            ),
            (
                IrqVerdict::IntxDelivered {
                    gsi: 17,
                    vector: INTX_VECTOR,
                    taken: 4,
                    empty: 1,
                    isr: 1,
                },
                "INTx GSI 17 delivered through the IOAPIC as interrupt 0x80, 4 taken (1 found \
                 the ISR 0), ISR 0x1",
            ),
        ];
        for (v, text) in ok {
            assert!(!v.failed(), "{v}");
            assert_eq!(v.to_string(), text);
        }
        let failed = [
            (
                IrqVerdict::IsrNotSet { acks: 3 },
                "INTx: the device used buffers (3 polls found them) but the ISR's queue bit \
                 (0x1) did not come within 500 ms",
            ),
            (
                IrqVerdict::IsrNotCleared {
                    first: 1,
                    second: 1,
                },
                "INTx: the ISR read 0x1, then 0x1: a read must clear it",
            ),
            (
                IrqVerdict::PbaWithoutMsix(2),
                "INTx: vector 2 is pending in the PBA with MSI-X disabled",
            ),
            (
                IrqVerdict::Refused(None, NO_VECTOR, 0),
                "MSI-X: config_msix_vector reads 0 after writing NO_VECTOR (0xffff)",
            ),
            (
                IrqVerdict::NotDelivered {
                    acks: 1,
                    pending: 0b10,
                },
                "MSI-X: the device used buffers (1 polls found them) but no queue vector's \
                 interrupt (0x41..) arrived within 500 ms; vector 1 is pending in the PBA (held \
                 back as if masked)",
            ),
            (
                IrqVerdict::NotDelivered {
                    acks: 1,
                    pending: 0,
                },
                "MSI-X: the device used buffers (1 polls found them) but no queue vector's \
                 interrupt (0x41..) arrived within 500 ms; nothing is pending in the PBA",
            ),
            (
                IrqVerdict::IntxNotDelivered {
                    gsi: 17,
                    acks: 1,
                    taken: 0,
                    isr: 0,
                    isr_now: 1,
                },
                "INTx GSI 17: the device used buffers (1 polls found them) but interrupt 0x80 \
                 did not arrive within 500 ms (the ISR reads 0x1 now)",
            ),
            (
                IrqVerdict::IntxNotDelivered {
                    gsi: 17,
                    acks: 1,
                    taken: 2,
                    isr: 0,
                    isr_now: 0,
                },
                "INTx GSI 17: the device used buffers (1 polls found them) but interrupt 0x80 \
                 came 2 times and its handler read the ISR as 0x0, never with the queue bit (the \
                 ISR reads 0x0 now)",
            ),
        ];
        for (v, text) in failed {
            assert!(v.failed(), "{v}");
            assert_eq!(v.to_string(), text);
        }
    }

    #[test]
    fn open_errors_read_well() {
        use std::string::ToString;
        for (e, text) in [
            (
                OpenError::IntxPin(0),
                "interrupt pin register reads 0 (expected 1, INTA)",
            ),
            (
                OpenError::IntxLine(5),
                "interrupt line register reads 5 (expected a GSI in 16..=23)",
            ),
            (
                OpenError::NoMsix,
                "no MSI-X capability (probe.pci_irq=msix)",
            ),
            (
                OpenError::MsixControl {
                    wrote: 0x0001,
                    read: 0x8001,
                },
                "MSI-X message control reads 0x8001 after writing 0x0001",
            ),
            (
                OpenError::Lapic(0xff),
                "local APIC SVR reads 0xff after the software enable (bit 8)",
            ),
            (
                OpenError::Ioapic {
                    gsi: 17,
                    wrote: 0x8080,
                    read: 0x1_8080,
                },
                "IOAPIC redirection entry 17 reads 0x0000000000018080 after writing \
                 0x0000000000008080",
            ),
        ] {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn queue_and_all_entries() {
        assert_eq!(all_entries(0), 0);
        assert_eq!(all_entries(3), 0b111);
        assert_eq!(all_entries(64), u64::MAX);
        assert_eq!(all_entries(2048), u64::MAX);
        assert_eq!(queue_entries(3), 0b110, "entry 0 is the configuration's");
        assert_eq!(queue_entries(1), 0b1, "one entry: shared");
        assert_eq!(queue_entries(0), 0);
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
        poke(CFG + 0x3c, &[17, 1]); // interrupt line (GSI 17), pin INTA
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
        let t = PciTransport::open(&ecam, &f, PciIrq::MsixMasked).unwrap_or_else(|e| panic!("{e}"));

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
        assert_eq!(t.irq_verdict(), IrqVerdict::Untested(PciIrq::MsixMasked, 0));

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
        assert_eq!(t.irq_verdict(), IrqVerdict::NotPending { acks: 1 });
        poke(BAR + 0x5000, &[0b001]);
        assert_eq!(t.irq_verdict(), IrqVerdict::NotPending { acks: 1 });
        poke(BAR + 0x5000, &[0b101]);
        assert_eq!(t.irq_verdict(), IrqVerdict::Pending(2));
        t.ack_interrupts();
        poke(BAR + 0x5000, &[0]);
        assert_eq!(
            t.irq_verdict(),
            IrqVerdict::Pending(2),
            "seen during the run"
        );

        // Opened again with a queue vector pending: proves nothing.
        poke(BAR + 0x5000, &[0b010]);
        let again =
            PciTransport::open(&ecam, &f, PciIrq::MsixMasked).unwrap_or_else(|e| panic!("{e}"));
        again.ack_interrupts();
        assert_eq!(again.irq_verdict(), IrqVerdict::PendingBefore(1));

        // A command register that keeps memory decode off cannot be driven: here the write
        // is taken, so break the structure instead: COMMON_CFG too short.
        let mut short = f;
        short.layout.common.length = 0x20;
        assert!(matches!(
            PciTransport::open(&ecam, &short, PciIrq::MsixMasked),
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
            PciTransport::open(&ecam, &high, PciIrq::MsixMasked),
            Err(OpenError::Region {
                addr: Some(0x1_0000_0000),
                ..
            })
        ));

        intx_in_memory(&ecam, &f);
    }

    /// `probe.pci_irq=intx` against plain memory (which, unlike an ISR, keeps what it holds
    /// when read): the registers written, and the verdicts that memory can produce.
    fn intx_in_memory(ecam: &Ecam, f: &VirtioFunction) {
        assert_eq!((f.interrupt_line, f.interrupt_pin), (17, 1));
        poke(BAR + 0x1000, &[0]);
        poke(BAR + 0x5000, &[0]);
        let t = PciTransport::open(ecam, f, PciIrq::Intx).unwrap_or_else(|e| panic!("{e}"));
        // INTx enabled (bit 10 clear), memory decode and bus master; MSI-X disabled (the
        // function mask left as it was).
        assert_eq!(peek16(CFG + 4), 0x0006);
        assert_eq!(peek16(CFG + 0x42), 0x4002);
        assert_eq!(
            t.irq_verdict(),
            IrqVerdict::Untested(PciIrq::Intx, 17),
            "nothing acknowledged"
        );
        // Every vector NO_VECTOR.
        poke(BAR + common::QUEUE_NOTIFY_OFF, &0u16.to_le_bytes());
        let a = QueueAddresses {
            desc: 0x10_0000,
            driver: 0x10_1000,
            device: 0x10_2000,
        };
        t.set_queue(0, 8, a);
        assert_eq!(peek16(BAR + common::CONFIG_MSIX_VECTOR), NO_VECTOR);
        assert_eq!(peek16(BAR + common::QUEUE_MSIX_VECTOR), NO_VECTOR);
        // The queue bit is read twice; memory does not clear it, which must fail.
        poke(BAR + 0x1000, &[1]);
        assert_eq!(t.ack_interrupts(), 1);
        assert_eq!(
            t.irq_verdict(),
            IrqVerdict::IsrNotCleared {
                first: 1,
                second: 1
            }
        );
        // A pending bit with MSI-X disabled fails first.
        poke(BAR + 0x5000, &[0b001]);
        assert_eq!(t.irq_verdict(), IrqVerdict::PbaWithoutMsix(0));
        poke(BAR + 0x5000, &[0]);
        drop(t);

        // A used buffer and no queue bit, even after the wait for a late one.
        poke(BAR + 0x1000, &[2]);
        let t = PciTransport::open(ecam, f, PciIrq::Intx).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.ack_interrupts(), 2, "the configuration bit is passed on");
        poke(BAR + 0x1000, &[0]);
        assert_eq!(t.irq_verdict(), IrqVerdict::IsrNotSet { acks: 1 });
        drop(t);

        // The registers INTx needs, and MSI-X for msix (checked before any APIC is touched).
        let mut no_pin = *f;
        no_pin.interrupt_pin = 0;
        assert!(matches!(
            PciTransport::open(ecam, &no_pin, PciIrq::Intx),
            Err(OpenError::IntxPin(0))
        ));
        let mut isa_line = *f;
        isa_line.interrupt_line = 5;
        assert!(matches!(
            PciTransport::open(ecam, &isa_line, PciIrq::IntxIoapic),
            Err(OpenError::IntxLine(5))
        ));
        let mut no_msix = *f;
        no_msix.msix = None;
        assert!(matches!(
            PciTransport::open(ecam, &no_msix, PciIrq::Msix),
            Err(OpenError::NoMsix)
        ));
        // Without MSI-X, INTx still works: NO_VECTOR is what such a function reads anyway.
        let t = PciTransport::open(ecam, &no_msix, PciIrq::Intx).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.irq_verdict(), IrqVerdict::Untested(PciIrq::Intx, 17));
    }
}
