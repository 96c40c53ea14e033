//! PCI: the configuration space of a function ([`config`]), MSI-X ([`msix`]) and the root
//! complex ([`root`]): a host bridge and up to 31 single-function devices on bus 0, reached
//! through configuration mechanism #1 (ports 0xcf8..0xcff) and ECAM, with their memory BARs in
//! two windows (below 4 GiB and above RAM) that the VMM allocates at build and the guest may
//! move.
//!
//! What is not here: KVM. What a function needs from the VM (ioeventfds in its BARs, MSI
//! routes) goes through [`PciHost`], which the VMM implements with KVM ioctls and tests with
//! [`testing::RecordingHost`]. The virtio-pci transport is `crate::virtio::pci`.

pub mod config;
pub mod msix;
pub mod root;
pub mod testing;

use std::io;

use vmm_sys_util::eventfd::EventFd;

pub use config::{BarKind, BarSpec, BarWindow, ConfigSpace, PciIds};
pub use msix::{Msix, MsixDelivery, MsixVector};
pub use root::{
    PciConfigIo, PciEcam, PciMmioWindow, PciRoot, PciWindows, PlacedBar, SharedPciDevice,
};

/// An MSI message: what a device writes, and where, to interrupt a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// The message address (0xfee0_0000 | destination on x86).
    pub address: u64,
    /// The message data (vector, delivery mode, trigger).
    pub data: u32,
}

/// What a PCI function needs from the virtual machine; the VMM implements it over its VM fd.
///
/// The calls come from the thread that handles the guest's access (a vCPU thread) or from the
/// VMM thread at build, never from a device thread, and never while the implementation could
/// be waiting on the caller: an implementation takes no lock that a bus access holds.
pub trait PciHost: Send + Sync {
    /// Registers `evt` as a KVM_IOEVENTFD for guest MMIO writes of any length at `addr`, with
    /// no datamatch (kvm-ioctls: `IoEventAddress::Mmio(addr)` with `NoDatamatch`).
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
    /// Removes what [`register_ioevent`](Self::register_ioevent) registered with the same
    /// arguments.
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
    /// Sets the route of `gsi` to the MSI `msg` (KVM_IRQ_ROUTING_MSI), or removes it when
    /// `msg` is `None`. The VMM keeps the whole routing table (the IOAPIC pins included) and
    /// submits it with KVM_SET_GSI_ROUTING; the eventfd registered with KVM_IRQFD on `gsi`
    /// then delivers `msg`.
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
}

/// A PCI function on the root complex: its configuration space, and its BARs' registers.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The same, to change (the root programs BARs at build through it).
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// The guest reads configuration space (the access is 1, 2 or 4 bytes inside one dword;
    /// the root checked). Devices with registers that act on reads override it.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// The guest writes configuration space. Devices with registers that act on writes
    /// (MSI-X control, the virtio PCI configuration access window) override it.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// The guest reads `data.len()` bytes at `offset` in BAR `bar` (the whole access is
    /// inside the BAR, and memory decoding is on).
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `new` (None: nowhere) instead of `old`: move whatever is
    /// registered in it (ioeventfds). Called at build when the root places it, and when a guest
    /// moves it.
    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        let _ = (bar, old, new);
    }
}

/// Errors of PCI set-up (at build: nothing a guest does returns one).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// A BAR declaration the configuration space cannot hold.
    #[error("BAR {index}: {reason}")]
    BadBar {
        /// The BAR register.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A capability shorter than its two header bytes.
    #[error("a capability of {0} bytes has no room for its header")]
    CapabilityTooShort(usize),
    /// The capabilities do not fit in the legacy configuration space.
    #[error("no room for a {needed}-byte capability in configuration space")]
    CapabilitySpaceFull {
        /// Its size.
        needed: usize,
    },
    /// All 31 device slots of bus 0 are taken.
    #[error("all 31 PCI slots of bus 0 are taken")]
    NoFreeSlot,
    /// A BAR window has no room left.
    #[error("the {window:?} PCI window has no room for a BAR of {size:#x} bytes")]
    WindowFull {
        /// The window.
        window: BarWindow,
        /// The BAR's size.
        size: u64,
    },
    /// A window that is empty, wraps, or (the 32-bit one) reaches past 4 GiB.
    #[error("bad PCI window {start:#x}+{size:#x}")]
    BadWindow {
        /// Its start.
        start: u64,
        /// Its size.
        size: u64,
    },
}
