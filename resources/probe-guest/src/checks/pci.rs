//! The `pci` check: is the PCI bus what an OS expects, and is every virtio-pci function on it
//! one a driver can use?
//!
//! 1. MCFG (ACPI, checksummed): one allocation, segment 0, buses 0..=0, base 0xe000_0000
//!    (cgvm's `PCI_ECAM_START`).
//! 2. Bus 0, all 32 devices × 8 functions, through ECAM and through configuration mechanism #1
//!    (0xcf8/0xcfc): the ID dword must read the same both ways, all-ones for an absent
//!    function; a present function's first 256 bytes must be identical both ways. A function
//!    above 0 may only answer when function 0 has the multi-function bit.
//! 3. The host bridge: 00:00.0, class 06/00/00.
//! 4. Every virtio function (vendor 0x1af4): a modern device ID of a known type (0x1040 +
//!    type), revision >= 1, header layout 0; BAR0 a 64-bit memory BAR; the BARs sized as
//!    firmware does (decode off in the command register, all-ones written, the mask read, the
//!    value and the command register restored and read back): BAR0's size a power of two,
//!    BAR0 aligned to it and inside the 32-bit window 0xd000_0000..0xe000_0000, no two
//!    functions' BAR0s overlapping; a well-formed capability list (no loop, every pointer in
//!    0x40..=0xfc and dword-aligned); the virtio capabilities COMMON (>= 0x38 bytes, offset
//!    4-aligned), NOTIFY (>= 2 bytes, offset 2-aligned, notify_off_multiplier 0 or an even power
//!    of two), ISR (>= 1 byte), DEVICE (offset 4-aligned; required unless the type has no
//!    configuration, as rng) and PCI_CFG, each structure inside its (sized) memory BAR and none
//!    overlapping another; an MSI-X capability whose table and PBA lie inside a sized memory
//!    BAR and overlap nothing; and, memory decode on (turned on for the while if it was off),
//!    num_queues >= 1, every queue's notify
//!    address (queue_notify_off × multiplier) inside the notify structure, and the PCI_CFG
//!    window (bar, offset, length = 2 written, pci_cfg_data read) giving the same num_queues
//!    as BAR0 does.
//!
//! Every problem is reported, each naming the function and the step. The `ok` line lists what
//! was found: `00:01.0 1af4:1042 blk (BAR0 0xd0000000 32 KiB, MSI-X 2 vectors, 1 queue)`.

use core::fmt::{self, Write};

use crate::checks::{Context, Report};
use crate::discovery;
use crate::mmio::Regs;
use crate::pci::{
    self, Bar, BarSizes, Bdf, ConfigAccess, ConfigSpace, Ecam, McfgEntry, Msix, PortIo, Region,
    VirtioLayout, COMMAND, COMMAND_MEMORY, DEVICES, VENDOR_VIRTIO, VIRTIO_CAP_COMMON,
    VIRTIO_CAP_DEVICE, VIRTIO_CAP_ISR, VIRTIO_CAP_NOTIFY, VIRTIO_CAP_PCI_CFG,
};
use crate::text::{Line, Size};
use crate::virtio::pci::COMMON_CFG_LEN;

/// Where cgvm's ECAM region is (boot/src/layout.rs `PCI_ECAM_START`).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// The last bus (`PCI_LAST_BUS`).
pub const PCI_LAST_BUS: u8 = 0;
/// The 32-bit BAR window (`PCI_MMIO32_START`, `PCI_MMIO32_SIZE`).
pub const PCI_MMIO32_START: u64 = 0xd000_0000;
/// End of the 32-bit BAR window (exclusive).
pub const PCI_MMIO32_END: u64 = PCI_MMIO32_START + 0x1000_0000;
/// Most queues whose notify offset is checked.
const MAX_QUEUES_CHECKED: u16 = 64;
/// Common configuration: num_queues, queue_select, queue_notify_off.
const NUM_QUEUES: u64 = 0x12;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;

/// Runs the pci check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let Some(ecam) = check_mcfg(ctx, report) else {
        return;
    };
    let mut line = Line::<1536>::new();
    let mut windows = BarWindows::default();
    let mut f0 = [None::<bool>; DEVICES as usize];
    let mut present = 0;
    let mut bridge = false;
    for bdf in Bdf::all_on(0) {
        let via_ecam = ecam.read_u32(bdf, 0);
        let via_ports = PortIo.read_u32(bdf, 0);
        if via_ecam != via_ports {
            report.fail(format_args!(
                "{bdf}: ID dword 0x{via_ecam:08x} through ECAM, 0x{via_ports:08x} through 0xcf8"
            ));
            continue;
        }
        if via_ecam as u16 == u16::MAX {
            if via_ecam != u32::MAX {
                report.fail(format_args!(
                    "{bdf}: absent function (vendor 0xffff) reads 0x{via_ecam:08x}, expected \
                     all-ones"
                ));
            }
            continue;
        }
        present += 1;
        let cfg = ConfigSpace::read(&ecam, bdf);
        let through_ports = ConfigSpace::read(&PortIo, bdf);
        if let Some(at) = cfg.first_difference(&through_ports) {
            report.fail(format_args!(
                "{bdf}: config byte 0x{at:02x} reads 0x{:02x} through ECAM, 0x{:02x} through 0xcf8",
                cfg.0[at], through_ports.0[at]
            ));
        }
        let dev = usize::from(bdf.dev);
        if bdf.func == 0 {
            f0[dev] = Some(cfg.multi_function());
        } else if f0[dev] != Some(true) {
            report.fail(format_args!(
                "{bdf} answers but {:02x}:{:02x}.0 {}",
                bdf.bus,
                bdf.dev,
                if f0[dev].is_some() {
                    "has no multi-function bit"
                } else {
                    "is absent"
                }
            ));
        }
        let entry = &mut Line::<160>::new();
        // Line's write_fmt never fails (it truncates).
        let _ = write!(entry, "{bdf} {:04x}:{:04x}", cfg.vendor(), cfg.device());
        if bdf == Bdf::default() {
            bridge = true;
            check_host_bridge(&cfg, report);
            let _ = write!(entry, " host bridge");
        } else if cfg.vendor() == VENDOR_VIRTIO {
            check_virtio(&ecam, bdf, &cfg, &mut windows, entry, report);
        } else {
            let (class, sub, prog) = cfg.class();
            let _ = write!(entry, " class {class:02x}/{sub:02x}/{prog:02x}");
        }
        let _ = write!(line, "; {entry}");
    }
    if !bridge {
        report.fail(format_args!("no host bridge: 00:00.0 is absent"));
    }
    report.detail(format_args!(
        "ECAM 0x{:x} from the MCFG, bus 0: {present} functions, identical through 0xcf8/0xcfc{line}",
        ecam.base()
    ));
}

/// Finds the MCFG and checks its allocation; the ECAM region to use (`None`: none usable,
/// reported).
fn check_mcfg(ctx: &Context<'_>, report: &mut Report) -> Option<Ecam> {
    let mcfg = match pci::find_mcfg(ctx.mem, ctx.boot_params.acpi_rsdp_addr) {
        Ok(Some(m)) => m,
        Ok(None) => {
            report.fail(format_args!("no MCFG in the ACPI tables"));
            return None;
        }
        Err(e) => {
            report.fail(format_args!("MCFG: {e}"));
            return None;
        }
    };
    mcfg_problems(mcfg.entries(), report);
    match discovery::find_ecam(ctx) {
        Ok(Some(ecam)) => Some(ecam),
        Ok(None) => None,
        Err(e) => {
            report.fail(format_args!("{e}"));
            None
        }
    }
}

/// What the MCFG must say on cgvm: one allocation, segment 0, buses 0..=0, base
/// [`PCI_ECAM_START`].
pub fn mcfg_problems(entries: &[McfgEntry], report: &mut Report) {
    if entries.len() != 1 {
        report.fail(format_args!(
            "MCFG has {} allocations (expected 1)",
            entries.len()
        ));
    }
    let Some(e) = entries.first() else {
        return;
    };
    if e.base != PCI_ECAM_START {
        report.fail(format_args!(
            "MCFG: ECAM base 0x{:x} (expected 0x{PCI_ECAM_START:x})",
            e.base
        ));
    }
    if e.segment != 0 || e.first_bus != 0 || e.last_bus != PCI_LAST_BUS {
        report.fail(format_args!(
            "MCFG: segment {} buses {}..={} (expected segment 0 buses 0..={PCI_LAST_BUS})",
            e.segment, e.first_bus, e.last_bus
        ));
    }
}

/// 00:00.0 must be a host bridge.
fn check_host_bridge(cfg: &ConfigSpace, report: &mut Report) {
    let (class, sub, prog) = cfg.class();
    if (class, sub, prog) != (0x06, 0x00, 0x00) {
        report.fail(format_args!(
            "00:00.0: class {class:02x}/{sub:02x}/{prog:02x} (expected 06/00/00, a host bridge)"
        ));
    }
    if cfg.header_layout() != 0 {
        report.fail(format_args!(
            "00:00.0: header layout {} (expected 0)",
            cfg.header_layout()
        ));
    }
}

/// The BAR0 windows seen so far, to find overlaps between functions.
#[derive(Default)]
struct BarWindows {
    seen: [(Bdf, u64, u64); DEVICES as usize],
    len: usize,
}

impl BarWindows {
    /// Adds `bdf`'s window; the function it overlaps, if any.
    fn add(&mut self, bdf: Bdf, base: u64, size: u64) -> Option<Bdf> {
        let end = base.saturating_add(size);
        let clash = self.seen[..self.len]
            .iter()
            .find(|&&(_, b, s)| base < b.saturating_add(s) && b < end)
            .map(|&(other, _, _)| other);
        if let Some(slot) = self.seen.get_mut(self.len) {
            *slot = (bdf, base, size);
            self.len += 1;
        }
        clash
    }
}

/// Checks a virtio function (see the module docs) and describes it in `entry`.
fn check_virtio(
    ecam: &Ecam,
    bdf: Bdf,
    cfg: &ConfigSpace,
    windows: &mut BarWindows,
    entry: &mut Line<160>,
    report: &mut Report,
) {
    let fail = |report: &mut Report, args: fmt::Arguments<'_>| {
        report.fail(format_args!("{bdf}: {args}"));
    };
    let Some(device_type) = pci::modern_virtio_type(cfg.vendor(), cfg.device()) else {
        return fail(
            report,
            format_args!(
                "1af4:{:04x} is no modern virtio device ID (0x1040 + type)",
                cfg.device()
            ),
        );
    };
    match pci::virtio_type_name(device_type) {
        // Line's write_fmt never fails (it truncates).
        Some(name) => {
            let _ = write!(entry, " {name}");
        }
        None => fail(
            report,
            format_args!("unknown virtio device type {device_type}"),
        ),
    }
    if cfg.revision() == 0 {
        fail(report, format_args!("revision 0 (expected >= 1)"));
    }
    if cfg.header_layout() != 0 {
        fail(
            report,
            format_args!("header layout {} (expected 0)", cfg.header_layout()),
        );
    }

    // BARs.
    let sizes = pci::size_bars(ecam, bdf, cfg);
    bar_problems(&sizes, &mut |args| fail(report, args));
    let bar0 = sizes.bars[0];
    if let (Bar::Mem64 { base, .. }, Ok(size)) = (bar0.bar, bar0.size) {
        let _ = write!(entry, " (BAR0 0x{base:x} {}", Size(size));
        if let Some(other) = windows.add(bdf, base, size) {
            fail(report, format_args!("BAR0 overlaps {other}'s"));
        }
    } else {
        let _ = write!(entry, " (BAR0 {}", bar0.bar);
    }

    // Capabilities.
    let caps = match pci::capabilities(cfg) {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(entry, ")");
            return fail(report, format_args!("{e}"));
        }
    };
    let layout = match pci::virtio_layout(cfg, &caps) {
        Ok(l) => Some(l),
        Err(e) => {
            fail(report, format_args!("{e}"));
            None
        }
    };
    let msix = match caps.as_slice().iter().find(|c| c.id == pci::CAP_MSIX) {
        None => {
            fail(report, format_args!("no MSI-X capability"));
            None
        }
        Some(c) => match pci::msix(cfg, c.offset) {
            Ok(m) => Some(m),
            Err(e) => {
                fail(report, format_args!("{e}"));
                None
            }
        },
    };
    if let Some(l) = &layout {
        layout_problems(l, device_type, &sizes, &mut |args| fail(report, args));
    }
    if let Some(m) = &msix {
        let _ = write!(entry, ", MSI-X {} vectors", m.table_size);
        msix_problems(m, layout.as_ref(), &sizes, &mut |args| fail(report, args));
    }

    // Queues, through the common configuration, with memory decode on for the while (the VMM
    // may leave it off, as firmware does until a driver wants the device).
    let common_base = layout.and_then(|l| bar_base(&sizes, l.common.bar));
    if let (Some(l), Some(base)) = (&layout, common_base) {
        let decode_off = sizes.command & COMMAND_MEMORY == 0;
        if decode_off {
            // The status half written as 0: its bits are write-1-to-clear.
            ecam.write_u32(bdf, COMMAND, u32::from(sizes.command | COMMAND_MEMORY));
        }
        if let Some(common) = Regs::new(base + u64::from(l.common.offset), COMMON_CFG_LEN) {
            let queues = common.read_u16(NUM_QUEUES);
            let _ = write!(
                entry,
                ", {queues} queue{}",
                if queues == 1 { "" } else { "s" }
            );
            if queues == 0 {
                fail(report, format_args!("num_queues is 0"));
            }
            for q in 0..queues.min(MAX_QUEUES_CHECKED) {
                common.write_u16(QUEUE_SELECT, q);
                let off = common.read_u16(QUEUE_NOTIFY_OFF);
                if let Some(why) = notify_problem(l, off) {
                    fail(report, format_args!("queue {q}: {why}"));
                }
            }
            if let Some(at) = l.pci_cfg {
                let (window, direct) = through_pci_cfg(ecam, bdf, at, l, &common);
                if window != direct {
                    fail(
                        report,
                        format_args!(
                            "PCI_CFG window: num_queues reads {window} through it, {direct} \
                             through BAR{}",
                            l.common.bar
                        ),
                    );
                }
            }
        }
        if decode_off {
            ecam.write_u32(bdf, COMMAND, u32::from(sizes.command));
        }
    }
    let _ = write!(entry, ")");
}

/// Reads COMMON_CFG's num_queues through the PCI_CFG capability at `at` (its bar, offset and
/// length 2 set, then the first two bytes of pci_cfg_data read) and directly (a 16-bit field is
/// accessed 16 bits wide either way): (through the window, direct).
fn through_pci_cfg(ecam: &Ecam, bdf: Bdf, at: u8, l: &VirtioLayout, common: &Regs) -> (u16, u16) {
    let at = u16::from(at);
    // Dword at+4: bar (byte 0), id, padding; only bar is the driver's.
    let bar_dword = ecam.read_u32(bdf, at + 4);
    ecam.write_u32(bdf, at + 4, (bar_dword & !0xff) | u32::from(l.common.bar));
    ecam.write_u32(bdf, at + 8, l.common.offset + NUM_QUEUES as u32);
    ecam.write_u32(bdf, at + 12, 2);
    let window = ecam.read_u32(bdf, at + 16) as u16;
    (window, common.read_u16(NUM_QUEUES))
}

/// A sized memory BAR's base.
fn bar_base(sizes: &BarSizes, bar: u8) -> Option<u64> {
    let b = sizes.bars.get(usize::from(bar))?;
    b.size.ok()?;
    b.bar.memory_base()
}

/// A sized memory BAR's size.
fn bar_size(sizes: &BarSizes, bar: u8) -> Option<u64> {
    let b = sizes.bars.get(usize::from(bar))?;
    b.bar.memory_base()?;
    b.size.ok()
}

/// What must hold of BAR0 and of the sizing (see the module docs).
pub fn bar_problems(sizes: &BarSizes, fail: &mut dyn FnMut(fmt::Arguments<'_>)) {
    let bar0 = &sizes.bars[0];
    match (bar0.bar, bar0.size) {
        (Bar::Mem64 { base, .. }, Ok(size)) => {
            if !base.is_multiple_of(size) {
                fail(format_args!(
                    "BAR0 0x{base:x} is not aligned to its size {}",
                    Size(size)
                ));
            }
            let inside = base >= PCI_MMIO32_START
                && base
                    .checked_add(size)
                    .is_some_and(|end| end <= PCI_MMIO32_END);
            if !inside {
                fail(format_args!(
                    "BAR0 0x{base:x} ({}) is outside the 32-bit window \
                     0x{PCI_MMIO32_START:x}..0x{PCI_MMIO32_END:x}",
                    Size(size)
                ));
            }
        }
        (Bar::Mem64 { .. }, Err(e)) => fail(format_args!(
            "BAR0 sizing: {e} (read 0x{:08x} 0x{:08x} after writing all-ones)",
            bar0.mask.0, bar0.mask.1
        )),
        (bar, _) => fail(format_args!("BAR0 is {bar} (expected a 64-bit memory BAR)")),
    }
    for b in &sizes.bars {
        if let Some((reg, wrote, read)) = b.not_restored {
            fail(format_args!(
                "BAR register 0x{reg:02x} reads 0x{read:08x} after sizing, restored to \
                 0x{wrote:08x}"
            ));
        }
    }
    if let Some(after) = sizes.command_not_restored {
        fail(format_args!(
            "command register reads 0x{after:04x} after sizing, restored to 0x{:04x}",
            sizes.command
        ));
    }
}

/// Where a structure must lie: inside its BAR, which must be a sized memory BAR.
fn region_problem(what: &str, r: &Region, sizes: &BarSizes) -> Option<Line<160>> {
    let mut why = Line::new();
    // Line's write_fmt never fails (it truncates).
    match bar_size(sizes, r.bar) {
        None => {
            let _ = write!(why, "{what} {r}: BAR{} is no sized memory BAR", r.bar);
        }
        Some(size) if r.end() > size => {
            let _ = write!(why, "{what} {r} runs past BAR{} ({})", r.bar, Size(size));
        }
        Some(_) => return None,
    }
    Some(why)
}

/// What must hold of the virtio structures (see the module docs).
pub fn layout_problems(
    l: &VirtioLayout,
    device_type: u16,
    sizes: &BarSizes,
    fail: &mut dyn FnMut(fmt::Arguments<'_>),
) {
    let name = pci::cfg_type_name;
    let mut regions = [None; 4];
    regions[0] = Some((VIRTIO_CAP_COMMON, l.common));
    regions[1] = Some((VIRTIO_CAP_NOTIFY, l.notify));
    regions[2] = Some((VIRTIO_CAP_ISR, l.isr));
    regions[3] = l.device.map(|d| (VIRTIO_CAP_DEVICE, d));
    for (t, r) in regions.iter().flatten() {
        if let Some(why) = region_problem(name(*t), r, sizes) {
            fail(format_args!("{why}"));
        }
    }
    let short = |t: u8, r: &Region, need: u64, fail: &mut dyn FnMut(fmt::Arguments<'_>)| {
        if u64::from(r.length) < need {
            fail(format_args!(
                "{} is {} bytes (at least {need})",
                name(t),
                r.length
            ));
        }
    };
    short(VIRTIO_CAP_COMMON, &l.common, COMMON_CFG_LEN, fail);
    short(VIRTIO_CAP_NOTIFY, &l.notify, 2, fail);
    short(VIRTIO_CAP_ISR, &l.isr, 1, fail);
    let misaligned = |t: u8, r: &Region, align: u32, fail: &mut dyn FnMut(fmt::Arguments<'_>)| {
        if !r.offset.is_multiple_of(align) {
            fail(format_args!(
                "{} offset 0x{:x} is not {align}-byte aligned",
                name(t),
                r.offset
            ));
        }
    };
    misaligned(VIRTIO_CAP_COMMON, &l.common, 4, fail);
    misaligned(VIRTIO_CAP_NOTIFY, &l.notify, 2, fail);
    match &l.device {
        Some(d) => misaligned(VIRTIO_CAP_DEVICE, d, 4, fail),
        None if pci::virtio_type_has_config(device_type) => {
            fail(format_args!("no {} capability", name(VIRTIO_CAP_DEVICE)))
        }
        None => {}
    }
    let m = l.notify_mult;
    if m != 0 && !(m.is_power_of_two() && m >= 2) {
        fail(format_args!(
            "notify_off_multiplier {m} is neither 0 nor an even power of two"
        ));
    }
    if l.pci_cfg.is_none() {
        fail(format_args!("no {} capability", name(VIRTIO_CAP_PCI_CFG)));
    }
    for (i, (ta, a)) in regions.iter().flatten().enumerate() {
        for (tb, b) in regions.iter().flatten().skip(i + 1) {
            if a.overlaps(b) {
                fail(format_args!("{} {a} overlaps {} {b}", name(*ta), name(*tb)));
            }
        }
    }
}

/// What must hold of the MSI-X table and PBA (see the module docs).
pub fn msix_problems(
    m: &Msix,
    layout: Option<&VirtioLayout>,
    sizes: &BarSizes,
    fail: &mut dyn FnMut(fmt::Arguments<'_>),
) {
    for (what, r) in [("MSI-X table", &m.table), ("MSI-X PBA", &m.pba)] {
        if let Some(why) = region_problem(what, r, sizes) {
            fail(format_args!("{why}"));
        }
    }
    if m.table.overlaps(&m.pba) {
        fail(format_args!(
            "MSI-X table {} overlaps the PBA {}",
            m.table, m.pba
        ));
    }
    let Some(l) = layout else {
        return;
    };
    let virtio = [
        Some((VIRTIO_CAP_COMMON, l.common)),
        Some((VIRTIO_CAP_NOTIFY, l.notify)),
        Some((VIRTIO_CAP_ISR, l.isr)),
        l.device.map(|d| (VIRTIO_CAP_DEVICE, d)),
    ];
    for (what, r) in [("MSI-X table", &m.table), ("MSI-X PBA", &m.pba)] {
        for (t, v) in virtio.iter().flatten() {
            if r.overlaps(v) {
                fail(format_args!(
                    "{what} {r} overlaps {} {v}",
                    pci::cfg_type_name(*t)
                ));
            }
        }
    }
}

/// Whether queue notify offset `off` gives a notify address inside the notify structure.
pub fn notify_problem(l: &VirtioLayout, off: u16) -> Option<NotifyOutside> {
    let at = u64::from(off) * u64::from(l.notify_mult);
    (at + 2 > u64::from(l.notify.length)).then_some(NotifyOutside {
        off,
        at,
        len: l.notify.length,
    })
}

/// A queue's notify address past the notify structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyOutside {
    off: u16,
    at: u64,
    len: u32,
}

impl fmt::Display for NotifyOutside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queue_notify_off {} puts the notify address at 0x{:x}, past the {}-byte NOTIFY_CFG",
            self.off, self.at, self.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{SizeError, SizedBar};
    use std::string::{String, ToString};
    use std::vec::Vec;

    fn sizes(bar0: Bar, size: Result<u64, SizeError>) -> BarSizes {
        let empty = SizedBar {
            bar: Bar::Empty,
            size: Err(SizeError::Unimplemented),
            mask: (0, 0),
            not_restored: None,
        };
        let mut bars = [empty; 6];
        bars[0] = SizedBar {
            bar: bar0,
            size,
            mask: (0xffff_c004, u32::MAX),
            not_restored: None,
        };
        bars[1].bar = Bar::Upper;
        BarSizes {
            bars,
            command: COMMAND_MEMORY,
            command_not_restored: None,
        }
    }

    fn bar0(base: u64) -> Bar {
        Bar::Mem64 {
            base,
            prefetchable: false,
        }
    }

    fn problems(run: impl FnOnce(&mut dyn FnMut(fmt::Arguments<'_>))) -> Vec<String> {
        let mut out = Vec::new();
        run(&mut |a| out.push(a.to_string()));
        out
    }

    fn region(offset: u32, length: u32) -> Region {
        Region {
            bar: 0,
            offset,
            length,
        }
    }

    /// cgvm's layout in a 16 KiB BAR0.
    fn layout() -> VirtioLayout {
        VirtioLayout {
            common: region(0, 0x38),
            notify: region(0x1800, 0x800),
            notify_mult: 4,
            isr: region(0x1000, 1),
            device: Some(region(0x800, 0x100)),
            pci_cfg: Some(0x90),
        }
    }

    fn msix() -> Msix {
        Msix {
            at: 0x40,
            control: 2,
            table_size: 3,
            table: region(0x2000, 48),
            pba: region(0x3000, 8),
        }
    }

    #[test]
    fn bar0_in_the_window() {
        let ok = sizes(bar0(0xd000_4000), Ok(0x4000));
        assert!(problems(|f| bar_problems(&ok, f)).is_empty());
        let out = problems(|f| bar_problems(&sizes(bar0(0xe000_0000), Ok(0x4000)), f));
        assert_eq!(
            out,
            ["BAR0 0xe0000000 (16 KiB) is outside the 32-bit window 0xd0000000..0xe0000000"]
        );
        let out = problems(|f| bar_problems(&sizes(bar0(0xdfff_e000), Ok(0x4000)), f));
        assert_eq!(out.len(), 2, "{out:?}: misaligned and past the end");
        let out = problems(|f| {
            bar_problems(
                &sizes(
                    Bar::Mem32 {
                        base: 0xd000_0000,
                        prefetchable: false,
                    },
                    Ok(0x4000),
                ),
                f,
            )
        });
        assert_eq!(
            out,
            ["BAR0 is 32-bit memory at 0xd0000000 (expected a 64-bit memory BAR)"]
        );
        let out = problems(|f| {
            bar_problems(
                &sizes(bar0(0xd000_0000), Err(SizeError::NotContiguous(0x7f))),
                f,
            )
        });
        assert_eq!(out.len(), 1);
        assert!(
            out[0].starts_with("BAR0 sizing: address mask 0x7f"),
            "{out:?}"
        );
        let mut restored_wrong = ok;
        restored_wrong.bars[0].not_restored = Some((0x10, 0xd000_4004, 0xffff_c004));
        restored_wrong.command_not_restored = Some(0);
        let out = problems(|f| bar_problems(&restored_wrong, f));
        assert_eq!(
            out,
            [
                "BAR register 0x10 reads 0xffffc004 after sizing, restored to 0xd0004004",
                "command register reads 0x0000 after sizing, restored to 0x0002"
            ]
        );
    }

    #[test]
    fn virtio_structures() {
        let s = sizes(bar0(0xd000_0000), Ok(0x4000));
        assert!(problems(|f| layout_problems(&layout(), 2, &s, f)).is_empty());
        // rng may go without DEVICE_CFG; blk may not.
        let mut l = layout();
        l.device = None;
        assert!(problems(|f| layout_problems(&l, 4, &s, f)).is_empty());
        assert_eq!(
            problems(|f| layout_problems(&l, 2, &s, f)),
            ["no DEVICE_CFG capability"]
        );

        let mut bad = layout();
        bad.common = region(0x2, 0x20);
        bad.notify = region(0x3801, 0x800);
        bad.notify_mult = 6;
        bad.isr = region(0x10, 1);
        bad.pci_cfg = None;
        let out = problems(|f| layout_problems(&bad, 2, &s, f));
        assert_eq!(
            out,
            [
                "NOTIFY_CFG BAR0 0x3801..0x4001 runs past BAR0 (16 KiB)",
                "COMMON_CFG is 32 bytes (at least 56)",
                "COMMON_CFG offset 0x2 is not 4-byte aligned",
                "NOTIFY_CFG offset 0x3801 is not 2-byte aligned",
                "notify_off_multiplier 6 is neither 0 nor an even power of two",
                "no PCI_CFG capability",
                "COMMON_CFG BAR0 0x2..0x22 overlaps ISR_CFG BAR0 0x10..0x11",
            ]
        );
        // A structure in a BAR that is not there.
        let mut elsewhere = layout();
        elsewhere.isr.bar = 2;
        assert_eq!(
            problems(|f| layout_problems(&elsewhere, 2, &s, f)),
            ["ISR_CFG BAR2 0x1000..0x1001: BAR2 is no sized memory BAR"]
        );
        let mut one = layout();
        one.notify_mult = 1;
        assert_eq!(problems(|f| layout_problems(&one, 2, &s, f)).len(), 1);
        one.notify_mult = 0;
        assert!(problems(|f| layout_problems(&one, 2, &s, f)).is_empty());
    }

    #[test]
    fn msix_table_and_pba() {
        let s = sizes(bar0(0xd000_0000), Ok(0x4000));
        let l = layout();
        assert!(problems(|f| msix_problems(&msix(), Some(&l), &s, f)).is_empty());
        let mut m = msix();
        m.pba = region(0x2020, 8);
        assert_eq!(
            problems(|f| msix_problems(&m, Some(&l), &s, f)),
            ["MSI-X table BAR0 0x2000..0x2030 overlaps the PBA BAR0 0x2020..0x2028"]
        );
        let mut m = msix();
        m.table = region(0x3ff0, 48);
        m.pba.bar = 4;
        assert_eq!(
            problems(|f| msix_problems(&m, Some(&l), &s, f)),
            [
                "MSI-X table BAR0 0x3ff0..0x4020 runs past BAR0 (16 KiB)",
                "MSI-X PBA BAR4 0x3000..0x3008: BAR4 is no sized memory BAR",
            ]
        );
        let mut m = msix();
        m.table = region(0x1000, 48);
        assert_eq!(
            problems(|f| msix_problems(&m, Some(&l), &s, f)),
            ["MSI-X table BAR0 0x1000..0x1030 overlaps ISR_CFG BAR0 0x1000..0x1001"]
        );
    }

    #[test]
    fn notify_addresses() {
        let l = layout();
        assert_eq!(notify_problem(&l, 0), None);
        assert_eq!(notify_problem(&l, 0x1ff), None, "0x7fc + 2 fits in 0x800");
        let p = notify_problem(&l, 0x200).unwrap_or_else(|| panic!("inside?"));
        assert_eq!(
            p.to_string(),
            "queue_notify_off 512 puts the notify address at 0x800, past the 2048-byte NOTIFY_CFG"
        );
        let mut zero = l;
        zero.notify_mult = 0;
        assert_eq!(
            notify_problem(&zero, u16::MAX),
            None,
            "all queues share one address"
        );
    }

    #[test]
    fn mcfg_must_be_cgvms() {
        let good = McfgEntry {
            base: 0xe000_0000,
            segment: 0,
            first_bus: 0,
            last_bus: 0,
        };
        let mut r = Report::default();
        mcfg_problems(&[good], &mut r);
        assert!(!r.failed());
        let mut r = Report::default();
        mcfg_problems(
            &[
                McfgEntry {
                    base: 0xb000_0000,
                    last_bus: 255,
                    ..good
                },
                good,
            ],
            &mut r,
        );
        assert_eq!(
            r.problems().to_string(),
            "MCFG has 2 allocations (expected 1); MCFG: ECAM base 0xb0000000 (expected \
             0xe0000000); MCFG: segment 0 buses 0..=255 (expected segment 0 buses 0..=0)"
        );
        let mut r = Report::default();
        mcfg_problems(&[], &mut r);
        assert_eq!(
            r.problems().to_string(),
            "MCFG has 0 allocations (expected 1)"
        );
    }

    #[test]
    fn overlapping_bars_are_caught() {
        let mut w = BarWindows::default();
        let b = |d| Bdf::new(0, d, 0).unwrap_or_else(|| unreachable!());
        assert_eq!(w.add(b(1), 0xd000_0000, 0x4000), None);
        assert_eq!(w.add(b(2), 0xd000_4000, 0x4000), None);
        assert_eq!(w.add(b(3), 0xd000_7000, 0x1000), Some(b(2)));
        assert_eq!(w.add(b(4), 0xcfff_f000, 0x2000), Some(b(1)));
    }
}
