//! The root complex: bus 0 with a host bridge at 00:00.0 and up to 31 single-function devices
//! in slots 1..31; configuration access through mechanism #1 ([`PciConfigIo`], ports
//! 0xcf8..0xcff) and ECAM ([`PciEcam`]); the two BAR windows ([`PciMmioWindow`]), each one
//! bus device that hands an access to whichever BAR holds it.
//!
//! The VMM builds a [`PciRoot`], adds its devices ([`PciRoot::add_device`] picks the slot and
//! allocates each BAR, naturally aligned, in the window the BAR asks for), then shares it
//! (`Arc`) with the four bus devices; nothing is added after that.
//!
//! The guest may move a BAR. A BAR decodes where its register says once its function's memory
//! decode bit is on, if that range lies inside a window the BAR can use (a 64-bit BAR either,
//! a 32-bit BAR the 32-bit one), is naturally aligned and overlaps no other decoding BAR;
//! otherwise it decodes nowhere (logged) until the guest writes a usable address. A BAR whose
//! register changes while decode is off stops decoding and is placed again when decode comes
//! on, so that the guest's sizing (all-ones written and read back, with decode off) moves
//! nothing twice. Each change is reported to the device ([`PciDevice::bar_moved`]) so that it
//! moves its ioeventfds. Accesses reach a BAR only while its function's decode bit is on.
//!
//! Guest accesses never fail or panic: an absent function, another bus, a function other than
//! 0, an access that is not 1, 2 or 4 bytes inside one dword, all read as all-ones and drop
//! writes.
//!
//! Locks: the BAR map, then one function. A configuration write that can move BARs (a BAR or
//! the command register) holds the map for writing, BAR accesses hold it for reading; nothing
//! that holds a function's lock takes the map.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::config::{
    BarKind, BarSpec, BarWindow, ConfigSpace, PciIds, BAR0, COMMAND, CONFIG_SPACE_SIZE, NUM_BARS,
};
use super::{PciDevice, PciError};
use crate::bus::BusDevice;

/// Device slots on bus 0 (slot 0 is the host bridge).
pub const NUM_SLOTS: u8 = 32;
/// Size of one function's ECAM region.
pub const ECAM_FUNCTION_SIZE: u64 = 0x1000;
/// Configuration mechanism #1: the enable bit of CONFIG_ADDRESS.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// The bits of CONFIG_ADDRESS that hold anything: enable, bus, device, function, register.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

/// Host bridge identity: Red Hat's "QEMU PCIe host bridge" (1b36:0008), which guests know.
const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x1b36,
    device: 0x0008,
    revision: 0,
    class: 0x06,
    subclass: 0x00,
    prog_if: 0x00,
    subsystem_vendor: 0x1b36,
    subsystem: 0x0008,
};

/// A function shared between the root and whoever else owns it (the VMM).
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The two windows the host bridge forwards to BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindows {
    /// Start of the window below 4 GiB (`layout::PCI_MMIO32_START`).
    pub mmio32_start: u64,
    /// Its size (`layout::PCI_MMIO32_SIZE`).
    pub mmio32_size: u64,
    /// Start of the window above RAM (`layout::pci_mmio64_start(mem_size)`).
    pub mmio64_start: u64,
    /// Its size (`layout::PCI_MMIO64_SIZE`).
    pub mmio64_size: u64,
}

impl PciWindows {
    /// Start and size of `window`.
    pub fn range(&self, window: BarWindow) -> (u64, u64) {
        match window {
            BarWindow::Mmio32 => (self.mmio32_start, self.mmio32_size),
            BarWindow::Mmio64 => (self.mmio64_start, self.mmio64_size),
        }
    }

    fn contains(&self, window: BarWindow, base: u64, size: u64) -> bool {
        let (start, len) = self.range(window);
        base >= start && base.checked_add(size).is_some_and(|end| end <= start + len)
    }
}

/// Where a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacedBar {
    /// The function's slot on bus 0.
    pub slot: u8,
    /// The BAR register.
    pub bar: usize,
    /// Its first address.
    pub base: u64,
    /// Its size.
    pub size: u64,
}

/// The BARs that decode, by base address, and what was refused (logged once per address).
#[derive(Default)]
struct BarMap {
    placed: BTreeMap<u64, PlacedBar>,
    /// (slot, bar) -> the address last refused (logged once).
    refused: HashMap<(u8, usize), u64>,
}

impl BarMap {
    fn placement(&self, slot: u8, bar: usize) -> Option<u64> {
        self.placed
            .values()
            .find(|p| p.slot == slot && p.bar == bar)
            .map(|p| p.base)
    }

    fn overlaps(&self, base: u64, size: u64) -> bool {
        let end = base.saturating_add(size);
        self.placed
            .range(..end)
            .next_back()
            .is_some_and(|(_, p)| p.base.saturating_add(p.size) > base)
    }

    fn find(&self, addr: u64, len: usize) -> Option<PlacedBar> {
        let (_, p) = self.placed.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (end <= p.base.saturating_add(p.size)).then_some(*p)
    }
}

/// The host bridge at 00:00.0: an identity and nothing else.
struct HostBridge {
    config: ConfigSpace,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

fn lock(dev: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bus 0 of the machine; see the module documentation.
pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
    windows: PciWindows,
    /// Allocation cursors of the two windows (build only).
    next: [u64; 2],
    bars: RwLock<BarMap>,
}

impl PciRoot {
    /// A root complex with only its host bridge, forwarding `windows` to BARs.
    pub fn new(windows: PciWindows) -> Result<Self, PciError> {
        for (start, size, limit) in [
            (windows.mmio32_start, windows.mmio32_size, 1u64 << 32),
            (windows.mmio64_start, windows.mmio64_size, u64::MAX),
        ] {
            if size == 0 || start.checked_add(size).is_none_or(|end| end > limit) {
                return Err(PciError::BadWindow { start, size });
            }
        }
        if windows.mmio32_start < windows.mmio64_start + windows.mmio64_size
            && windows.mmio64_start < windows.mmio32_start + windows.mmio32_size
        {
            return Err(PciError::BadWindow {
                start: windows.mmio64_start,
                size: windows.mmio64_size,
            });
        }
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; usize::from(NUM_SLOTS)];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_IDS, 0),
        })));
        Ok(Self {
            slots,
            windows,
            next: [windows.mmio32_start, windows.mmio64_start],
            bars: RwLock::new(BarMap::default()),
        })
    }

    /// The windows.
    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// Puts `device` in the first free slot, allocates its BARs (each naturally aligned in its
    /// window, after those allocated before), programs them and tells the device where they
    /// are ([`PciDevice::bar_moved`], so that it registers its ioeventfds). Returns the slot:
    /// the device is 00:slot.0.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = (1..NUM_SLOTS)
            .find(|&s| self.slots[usize::from(s)].is_none())
            .ok_or(PciError::NoFreeSlot)?;
        let mut dev = lock(&device);
        let mut next = self.next;
        let mut placed = Vec::new();
        for (bar, spec) in dev.config().bars() {
            let cursor = match spec.window {
                BarWindow::Mmio32 => &mut next[0],
                BarWindow::Mmio64 => &mut next[1],
            };
            let full = PciError::WindowFull {
                window: spec.window,
                size: spec.size,
            };
            let base = cursor
                .checked_next_multiple_of(spec.size)
                .ok_or(full.clone())?;
            if !self.windows.contains(spec.window, base, spec.size) {
                return Err(full);
            }
            *cursor = base + spec.size;
            placed.push(PlacedBar {
                slot,
                bar,
                base,
                size: spec.size,
            });
        }
        self.next = next;
        let map = self.bars.get_mut().unwrap_or_else(|e| e.into_inner());
        for p in &placed {
            dev.config_mut().set_bar_address(p.bar, p.base);
            map.placed.insert(p.base, *p);
        }
        for p in &placed {
            dev.bar_moved(p.bar, None, Some(p.base));
        }
        drop(dev);
        self.slots[usize::from(slot)] = Some(device);
        Ok(slot)
    }

    /// The function in `slot` (0: the host bridge).
    pub fn device(&self, slot: u8) -> Option<&SharedPciDevice> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// The BARs that decode now, by address.
    pub fn placed_bars(&self) -> Vec<PlacedBar> {
        self.map().placed.values().copied().collect()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BarMap> {
        self.bars.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The function a configuration access names, if it exists and the access is one a
    /// function answers (1, 2 or 4 bytes inside one dword of its 4 KiB).
    fn target(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        offset: usize,
        len: usize,
    ) -> Option<&SharedPciDevice> {
        let one_dword = matches!(len, 1 | 2 | 4)
            && offset % 4 + len <= 4
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= CONFIG_SPACE_SIZE);
        if !one_dword {
            log::debug!("pci: {len}-byte configuration access at {offset:#x} ignored");
            return None;
        }
        if bus != 0 || function != 0 {
            return None;
        }
        self.device(device)
    }

    /// A configuration read of `bus:device.function` at register `offset`; what does not exist
    /// reads as all-ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.target(bus, device, function, offset, data.len()) {
            Some(dev) => lock(dev).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; one that changes a BAR or the command register re-places BARs.
    pub fn config_write(&self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(dev) = self.target(bus, device, function, offset, data.len()) else {
            return;
        };
        let end = offset + data.len();
        let moves_bars =
            offset < BAR0 + 4 * NUM_BARS && end > BAR0 || (offset < COMMAND + 2 && end > COMMAND);
        if !moves_bars {
            lock(dev).write_config(offset, data);
            return;
        }
        let mut map = self.bars.write().unwrap_or_else(|e| e.into_inner());
        lock(dev).write_config(offset, data);
        self.reconcile(&mut map);
    }

    /// Makes every BAR decode where its register says, if it can (see the module
    /// documentation), and tells the devices what moved.
    fn reconcile(&self, map: &mut BarMap) {
        struct Want {
            slot: u8,
            bar: usize,
            spec: BarSpec,
            register: u64,
            decode: bool,
            old: Option<u64>,
            new: Option<u64>,
        }
        let mut wants = Vec::new();
        for (slot, dev) in self.slots.iter().enumerate() {
            let Some(dev) = dev else { continue };
            let slot = slot as u8;
            let dev = lock(dev);
            let decode = dev.config().memory_enabled();
            for (bar, spec) in dev.config().bars() {
                let Some(register) = dev.config().bar_address(bar) else {
                    continue;
                };
                let old = map.placement(slot, bar);
                wants.push(Want {
                    slot,
                    bar,
                    spec,
                    register,
                    decode,
                    old,
                    new: old,
                });
            }
        }
        // Out of the way first, so that two BARs can swap places in one pass.
        for w in wants.iter_mut() {
            if let Some(old) = w.old.filter(|&o| o != w.register) {
                map.placed.remove(&old);
                w.new = None;
            }
        }
        for w in wants.iter_mut().filter(|w| w.new.is_none() && w.decode) {
            let size = w.spec.size;
            let in_window = self.windows.contains(BarWindow::Mmio32, w.register, size)
                || (w.spec.kind == BarKind::Memory64
                    && self.windows.contains(BarWindow::Mmio64, w.register, size));
            let aligned = w.register % size == 0;
            let key = (w.slot, w.bar);
            if in_window && aligned && !map.overlaps(w.register, size) {
                map.placed.insert(
                    w.register,
                    PlacedBar {
                        slot: w.slot,
                        bar: w.bar,
                        base: w.register,
                        size,
                    },
                );
                map.refused.remove(&key);
                w.new = Some(w.register);
            } else if map.refused.insert(key, w.register) != Some(w.register) {
                let why = if !in_window {
                    "outside the PCI windows"
                } else if !aligned {
                    "not aligned to its size"
                } else {
                    "over another BAR"
                };
                // All-ones in either half is a guest sizing the BAR with decode on: expected.
                let sizing = (w.register as u32 | (size - 1) as u32) == u32::MAX
                    || (w.spec.kind == BarKind::Memory64 && w.register >> 32 == 0xffff_ffff);
                let level = if sizing {
                    log::Level::Debug
                } else {
                    log::Level::Warn
                };
                log::log!(
                    level,
                    "pci: 00:{:02x}.0 BAR {} at {:#x} ({:#x} bytes) is {why}: it answers nowhere",
                    w.slot,
                    w.bar,
                    w.register,
                    size
                );
            }
        }
        for w in wants.iter().filter(|w| w.old != w.new) {
            if let Some(dev) = self.device(w.slot) {
                log::debug!(
                    "pci: 00:{:02x}.0 BAR {} moves from {:x?} to {:x?}",
                    w.slot,
                    w.bar,
                    w.old,
                    w.new
                );
                lock(dev).bar_moved(w.bar, w.old, w.new);
            }
        }
    }

    /// Hands a BAR access at `addr` to the BAR that holds all of it, if its function decodes
    /// memory; false when nothing answers.
    fn bar_access(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn PciDevice, usize, u64),
    ) -> bool {
        let map = self.map();
        let Some(p) = map.find(addr, len) else {
            return false;
        };
        let Some(dev) = self.device(p.slot) else {
            return false;
        };
        let mut dev = lock(dev);
        if !dev.config().memory_enabled() {
            return false;
        }
        f(&mut *dev, p.bar, addr - p.base);
        true
    }

    /// A guest read at `addr` in a BAR window; all-ones where no BAR answers.
    pub fn bar_read(&self, addr: u64, data: &mut [u8]) {
        let len = data.len();
        if !self.bar_access(addr, len, |d, bar, off| d.read_bar(bar, off, data)) {
            data.fill(0xff);
        }
    }

    /// A guest write at `addr` in a BAR window; dropped where no BAR answers.
    pub fn bar_write(&self, addr: u64, data: &[u8]) {
        if !self.bar_access(addr, data.len(), |d, bar, off| d.write_bar(bar, off, data)) {
            log::debug!(
                "pci: {}-byte write at {addr:#x} where no BAR decodes",
                data.len()
            );
        }
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8 (a dword register: enable, bus,
/// device, function, register) and CONFIG_DATA at 0xcfc..0xcff (byte, word or dword accesses
/// of the addressed dword). Insert it on the port bus at `layout::PCI_CONFIG_PORT`, 8 ports.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// The ports of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, address: 0 }
    }

    /// The register the data ports reach now, if CONFIG_ADDRESS is enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & CONFIG_ADDRESS_ENABLE != 0).then_some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            (a & 0xfc) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, len) if offset - 4 + len as u64 <= 4 => match self.target() {
                Some((bus, dev, func, reg)) => {
                    self.root
                        .config_read(bus, dev, func, reg + (offset - 4) as usize, data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                self.address = u32::from_le_bytes(v) & CONFIG_ADDRESS_MASK;
            }
            (4..=7, len) if offset - 4 + len as u64 <= 4 => {
                if let Some((bus, dev, func, reg)) = self.target() {
                    self.root
                        .config_write(bus, dev, func, reg + (offset - 4) as usize, data);
                }
            }
            _ => log::debug!(
                "pci: {}-byte write at configuration port offset {offset} ignored",
                data.len()
            ),
        }
    }
}

/// ECAM (PCI Express enhanced configuration access): 4 KiB per function, bus 0 only. Insert it
/// on the MMIO bus at `layout::PCI_ECAM_START`, `layout::PCI_ECAM_SIZE` bytes; offsets of
/// other buses (a larger region) read as all-ones.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    /// The ECAM region of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> Option<(u8, u8, u8, usize)> {
        let bus = u8::try_from(offset >> 20).ok()?;
        Some((
            bus,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            (offset & (ECAM_FUNCTION_SIZE - 1)) as usize,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset) {
            Some((bus, dev, func, reg)) => self.root.config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg)) = Self::decode(offset) {
            self.root.config_write(bus, dev, func, reg, data);
        }
    }
}

/// One BAR window as a bus device: insert it once on the MMIO bus at the window's start with
/// the window's size; it hands each access to the BAR that holds it.
pub struct PciMmioWindow {
    root: Arc<PciRoot>,
    start: u64,
}

impl PciMmioWindow {
    /// The bus device of `window` of `root`, and where to insert it: (device, start, size).
    pub fn new(root: Arc<PciRoot>, window: BarWindow) -> (Self, u64, u64) {
        let (start, size) = root.windows().range(window);
        (Self { root, start }, start, size)
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.start.checked_add(offset) {
            Some(addr) => self.root.bar_read(addr, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(addr) = self.start.checked_add(offset) {
            self.root.bar_write(addr, data);
        }
    }
}

#[cfg(test)]
mod tests;
