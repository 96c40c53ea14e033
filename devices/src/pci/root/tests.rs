use std::sync::{Arc, Mutex};

use super::*;
use crate::pci::config::{command, tests::IDS, INTERRUPT_LINE};

const W32: u64 = 0xd000_0000;
const W64: u64 = 4 << 30;

fn windows() -> PciWindows {
    PciWindows {
        mmio32_start: W32,
        mmio32_size: 0x1000_0000,
        mmio64_start: W64,
        mmio64_size: 64 << 30,
    }
}

/// A function with a 32-bit BAR 0 (64 KiB), a 64-bit BAR 2 (16 KiB) in the 32-bit window and
/// a prefetchable 64-bit BAR 4 (1 GiB) in the 64-bit window. A BAR read returns
/// `bar << 24 | offset` (little endian, repeated); writes and moves are recorded.
struct TestFunction {
    config: ConfigSpace,
    writes: Vec<(usize, u64, Vec<u8>)>,
    moves: Vec<(usize, Option<u64>, Option<u64>)>,
}

impl TestFunction {
    fn new() -> Self {
        let mut config = ConfigSpace::new(IDS, 1);
        let spec = |kind, size, window| BarSpec {
            kind,
            size,
            prefetchable: window == BarWindow::Mmio64,
            window,
        };
        config
            .add_bar(0, spec(BarKind::Memory32, 0x1_0000, BarWindow::Mmio32))
            .unwrap();
        config
            .add_bar(2, spec(BarKind::Memory64, 0x4000, BarWindow::Mmio32))
            .unwrap();
        config
            .add_bar(4, spec(BarKind::Memory64, 1 << 30, BarWindow::Mmio64))
            .unwrap();
        config.add_capability(&[0x09, 0, 4, 0], &[]).unwrap();
        Self {
            config,
            writes: Vec::new(),
            moves: Vec::new(),
        }
    }
}

impl PciDevice for TestFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let v = ((bar as u32) << 24 | offset as u32).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v[i % 4];
        }
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.writes.push((bar, offset, data.to_vec()));
    }
    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        self.moves.push((bar, old, new));
    }
}

struct Machine {
    root: Arc<PciRoot>,
    functions: Vec<Arc<Mutex<TestFunction>>>,
    io: PciConfigIo,
    ecam: PciEcam,
    w32: PciMmioWindow,
    w64: PciMmioWindow,
}

fn machine(n: usize) -> Machine {
    let mut root = PciRoot::new(windows()).unwrap();
    let mut functions = Vec::new();
    for i in 0..n {
        let f = Arc::new(Mutex::new(TestFunction::new()));
        assert_eq!(root.add_device(f.clone()).unwrap(), i as u8 + 1);
        functions.push(f);
    }
    let root = Arc::new(root);
    let (w32, start, size) = PciMmioWindow::new(root.clone(), BarWindow::Mmio32);
    assert_eq!((start, size), (W32, 0x1000_0000));
    let (w64, start, _) = PciMmioWindow::new(root.clone(), BarWindow::Mmio64);
    assert_eq!(start, W64);
    Machine {
        io: PciConfigIo::new(root.clone()),
        ecam: PciEcam::new(root.clone()),
        root,
        functions,
        w32,
        w64,
    }
}

fn ecam_offset(slot: u8, reg: usize) -> u64 {
    (u64::from(slot) << 15) | reg as u64
}

impl Machine {
    fn ecam_read(&mut self, slot: u8, reg: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.ecam.read(ecam_offset(slot, reg), &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn ecam_write(&mut self, slot: u8, reg: usize, len: usize, v: u64) {
        self.ecam
            .write(ecam_offset(slot, reg), &v.to_le_bytes()[..len]);
    }

    fn select(&mut self, bus: u8, slot: u8, func: u8, reg: usize) {
        let a = 0x8000_0000u32
            | u32::from(bus) << 16
            | u32::from(slot) << 11
            | u32::from(func) << 8
            | (reg as u32 & 0xfc);
        self.io.write(0, &a.to_le_bytes());
    }

    fn io_read_bdf(&mut self, bus: u8, slot: u8, func: u8, reg: usize, len: usize) -> u64 {
        self.select(bus, slot, func, reg);
        let mut b = [0u8; 8];
        self.io.read(4 + (reg % 4) as u64, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn io_read(&mut self, slot: u8, reg: usize, len: usize) -> u64 {
        self.io_read_bdf(0, slot, 0, reg, len)
    }

    fn io_write(&mut self, slot: u8, reg: usize, len: usize, v: u64) {
        self.select(0, slot, 0, reg);
        self.io.write(4 + (reg % 4) as u64, &v.to_le_bytes()[..len]);
    }

    fn read32(&mut self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        if addr >= W64 {
            self.w64.read(addr - W64, &mut b);
        } else {
            self.w32.read(addr - W32, &mut b);
        }
        u32::from_le_bytes(b)
    }

    fn enable_memory(&mut self, slot: u8) {
        self.ecam_write(slot, COMMAND, 2, u64::from(command::MEMORY_SPACE));
    }

    fn bar(&self, slot: u8, bar: usize) -> Option<u64> {
        self.root
            .placed_bars()
            .iter()
            .find(|p| p.slot == slot && p.bar == bar)
            .map(|p| p.base)
    }

    fn moves(&self, slot: u8) -> Vec<(usize, Option<u64>, Option<u64>)> {
        std::mem::take(&mut self.functions[usize::from(slot) - 1].lock().unwrap().moves)
    }
}

#[test]
fn host_bridge_and_absent_functions() {
    let mut m = machine(1);
    assert_eq!(m.io_read(0, 0, 4), 0x0008_1b36);
    assert_eq!(
        m.ecam_read(0, 8, 4),
        0x0600_0000,
        "host bridge class 06/00/00"
    );
    assert_eq!(m.ecam_read(0, 0x0e, 1), 0, "header type 0");
    assert_eq!(m.io_read(1, 0, 4), 0x1044_1af4);
    for slot in [2u8, 17, 31] {
        assert_eq!(m.io_read(slot, 0, 4), 0xffff_ffff);
        assert_eq!(m.ecam_read(slot, 0, 4), 0xffff_ffff);
        assert_eq!(m.ecam_read(slot, 0x3c, 1), 0xff);
    }
    // Other functions of present devices, and other buses.
    assert_eq!(m.io_read_bdf(0, 1, 3, 0, 4), 0xffff_ffff);
    assert_eq!(m.ecam_read(1, 2 << 12, 4), 0xffff_ffff, "function 2");
    assert_eq!(m.io_read_bdf(1, 1, 0, 0, 4), 0xffff_ffff);
    let mut b = [0u8; 4];
    m.ecam.read(1 << 20, &mut b);
    assert_eq!(b, [0xff; 4]);
    m.ecam.read(u64::MAX - 3, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Writes to absent functions go nowhere.
    m.ecam_write(5, 0x3c, 1, 9);
    m.io_write(5, 0x3c, 1, 9);
    assert_eq!(m.ecam_read(5, 0x3c, 1), 0xff);
}

#[test]
fn config_address_register_and_data_port_sizes() {
    let mut m = machine(1);
    m.io.write(0, &0xffff_ffffu32.to_le_bytes());
    let mut b = [0u8; 4];
    m.io.read(0, &mut b);
    assert_eq!(
        u32::from_le_bytes(b),
        0x80ff_fffc,
        "reserved bits read as zero"
    );
    // Byte and word accesses to 0xcf8..0xcfb do not touch CONFIG_ADDRESS.
    m.io.write(3, &[0x01]);
    m.io.write(0, &[0, 0]);
    m.io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
    let mut w = [0u8; 2];
    m.io.read(2, &mut w);
    assert_eq!(w, [0xff, 0xff]);
    // Disabled: the data port reads all-ones and drops writes.
    m.io.write(0, &0x0000_083cu32.to_le_bytes());
    m.io.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    m.io.write(4, &[7]);
    assert_eq!(m.ecam_read(1, INTERRUPT_LINE, 1), 0);
    // Every size at every data port of the identity dword.
    let id = m.io_read(1, 0, 4);
    m.select(0, 1, 0, 0);
    for (off, len) in [
        (4, 1),
        (5, 1),
        (6, 1),
        (7, 1),
        (4, 2),
        (5, 2),
        (6, 2),
        (4, 4),
    ] {
        let mut d = [0u8; 4];
        m.io.read(off, &mut d[..len]);
        let shift = 8 * (off - 4);
        let want = (id >> shift) & ((1u64 << (8 * len)) - 1);
        assert_eq!(
            u64::from(u32::from_le_bytes(d)),
            want,
            "{len} bytes at {off}"
        );
    }
    // An access past 0xcff is not a configuration access.
    let mut d = [0u8; 4];
    m.io.read(6, &mut d);
    assert_eq!(d, [0xff; 4]);
    m.io.read(5, &mut d[..4]);
    assert_eq!(d, [0xff; 4]);
    // Word write through the data port of the interrupt line register.
    m.io_write(1, 0x3c, 2, 0xff0b);
    assert_eq!(m.ecam_read(1, 0x3c, 2), 0x010b, "the pin stays");
}

/// Two machines fed the same writes, one through CF8/CFC and one through ECAM, answer every
/// read identically, through either mechanism.
#[test]
fn cf8_and_ecam_give_identical_answers() {
    let mut a = machine(2);
    let mut b = machine(2);
    let writes: &[(u8, usize, usize, u64)] = &[
        (1, 0x04, 2, 0x0006),
        (1, 0x10, 4, 0xffff_ffff),
        (1, 0x18, 4, 0xd010_0000),
        (1, 0x3c, 1, 0x0a),
        (2, 0x0c, 1, 0x10),
        (2, 0x20, 4, 0xffff_ffff),
        (2, 0x24, 4, 0xffff_ffff),
        (2, 0x05, 1, 0x04),
        (0, 0x04, 2, 0xffff),
        (2, 0x41, 2, 0xffff),
    ];
    for &(slot, reg, len, v) in writes {
        a.io_write(slot, reg, len, v);
        b.ecam_write(slot, reg, len, v);
    }
    for slot in 0..NUM_SLOTS {
        for reg in 0..LEGACY_SIZE {
            for len in [1usize, 2, 4] {
                if reg % 4 + len > 4 {
                    continue;
                }
                let x = a.io_read(slot, reg, len);
                assert_eq!(x, a.ecam_read(slot, reg, len), "{slot}:{reg:#x}/{len}");
                assert_eq!(x, b.io_read(slot, reg, len), "{slot}:{reg:#x}/{len}");
                assert_eq!(x, b.ecam_read(slot, reg, len), "{slot}:{reg:#x}/{len}");
            }
        }
    }
    assert_eq!(a.root.placed_bars(), b.root.placed_bars());
}

const LEGACY_SIZE: usize = crate::pci::config::LEGACY_CONFIG_SIZE;

#[test]
fn every_size_at_every_offset_through_ecam() {
    let mut m = machine(1);
    let header: Vec<u64> = (0..0x40).step_by(4).map(|r| m.ecam_read(1, r, 4)).collect();
    for len in 1..=8usize {
        for reg in 0..CONFIG_SPACE_SIZE {
            let v = m.ecam_read(1, reg, len);
            let legal = matches!(len, 1 | 2 | 4) && reg % 4 + len <= 4;
            if !legal {
                assert_eq!(v, u64::MAX >> (64 - 8 * len), "{len} bytes at {reg:#x}");
            }
            m.ecam_write(1, reg, len, u64::MAX);
            m.ecam_write(1, reg, len, 0);
        }
    }
    for (i, r) in (0..0x40).step_by(4).enumerate() {
        let now = m.ecam_read(1, r, 4);
        match r {
            // Command, cache line, BARs, interrupt line: writable, last written zero.
            0x04 => assert_eq!(now, header[i] & 0xffff_0000),
            0x0c => assert_eq!(now & 0xff, 0),
            0x10..=0x24 => assert_eq!(now & !0xf, 0),
            0x3c => assert_eq!(now & 0xff, 0),
            _ => assert_eq!(now, header[i], "read-only dword {r:#x}"),
        }
    }
    assert_eq!(
        m.functions[0].lock().unwrap().config.capabilities(),
        [(0x40, 9)]
    );
    // Extended space reads as zero.
    assert_eq!(m.ecam_read(1, 0x100, 4), 0);
}

#[test]
fn hostile_configuration_accesses_are_ignored() {
    let mut m = machine(1);
    m.ecam_write(1, INTERRUPT_LINE, 1, 5);
    // Crossing a dword boundary, odd sizes, too large.
    m.ecam_write(1, 0x3b, 2, 0xffff);
    m.ecam_write(1, 0x3a, 4, 0xffff_ffff);
    m.ecam_write(1, 0x38, 8, u64::MAX);
    m.ecam_write(1, 0x3c, 3, 0xffffff);
    assert_eq!(m.ecam_read(1, INTERRUPT_LINE, 1), 5);
    assert_eq!(m.ecam_read(1, 0x3b, 2), 0xffff);
    assert_eq!(m.ecam_read(1, 0x3e, 4), 0xffff_ffff);
    assert_eq!(m.ecam_read(1, 0x38, 8), u64::MAX);
    assert_eq!(m.ecam_read(1, 0x3c, 3), 0xff_ffff);
    // Unaligned but inside one dword is a legal PCI access.
    assert_eq!(m.ecam_read(1, 0x3d, 2), 0x0001, "pin, then min_gnt");
    assert_eq!(m.ecam_read(1, 0x01, 2), 0x4400 | 0x1a);
    let mut empty = [0u8; 0];
    m.ecam.read(ecam_offset(1, 0), &mut empty);
    m.ecam.write(ecam_offset(1, 0), &empty);
}

#[test]
fn bars_are_allocated_aligned_in_their_windows() {
    let m = machine(3);
    let placed = m.root.placed_bars();
    assert_eq!(placed.len(), 9);
    for p in &placed {
        assert_eq!(p.base % p.size, 0, "{p:?} naturally aligned");
        let (start, size) = if p.bar == 4 {
            (W64, 64 << 30)
        } else {
            (W32, 0x1000_0000)
        };
        assert!(p.base >= start && p.base + p.size <= start + size, "{p:?}");
    }
    for w in placed.windows(2) {
        assert!(w[0].base + w[0].size <= w[1].base, "{w:?} overlap");
    }
    for slot in 1..=3u8 {
        let moves = m.moves(slot);
        assert_eq!(moves.len(), 3);
        let f = m.functions[usize::from(slot) - 1].lock().unwrap();
        for (bar, old, new) in moves {
            assert_eq!(old, None);
            assert_eq!(
                new,
                f.config.bar_address(bar),
                "registers hold the placement"
            );
        }
    }
    assert_eq!(m.bar(1, 0), Some(W32));
    assert_eq!(m.bar(1, 2), Some(W32 + 0x1_0000));
    assert_eq!(
        m.bar(2, 0),
        Some(W32 + 0x2_0000),
        "aligned up past BAR 2 of slot 1"
    );
    assert_eq!(m.bar(1, 4), Some(W64));
    assert_eq!(m.bar(3, 4), Some(W64 + (2 << 30)));
}

#[test]
fn full_windows_and_slots_are_errors() {
    let mut small = windows();
    small.mmio32_size = 0x2_0000;
    let mut root = PciRoot::new(small).unwrap();
    root.add_device(Arc::new(Mutex::new(TestFunction::new())))
        .unwrap();
    assert_eq!(
        root.add_device(Arc::new(Mutex::new(TestFunction::new()))),
        Err(PciError::WindowFull {
            window: BarWindow::Mmio32,
            size: 0x1_0000
        })
    );
    assert_eq!(root.placed_bars().len(), 3, "a failed add places nothing");
    let mut root = PciRoot::new(windows()).unwrap();
    for _ in 1..NUM_SLOTS {
        let mut f = TestFunction::new();
        f.config = ConfigSpace::new(IDS, 0);
        root.add_device(Arc::new(Mutex::new(f))).unwrap();
    }
    assert_eq!(
        root.add_device(Arc::new(Mutex::new(TestFunction::new()))),
        Err(PciError::NoFreeSlot)
    );
    // Windows that wrap, are empty, reach past 4 GiB or overlap.
    for bad in [
        PciWindows {
            mmio32_size: 0,
            ..windows()
        },
        PciWindows {
            mmio32_start: 0xffff_0000,
            ..windows()
        },
        PciWindows {
            mmio64_start: u64::MAX - 0xfff,
            ..windows()
        },
        PciWindows {
            mmio64_start: W32,
            mmio64_size: 0x1000,
            ..windows()
        },
    ] {
        assert!(PciRoot::new(bad).is_err(), "{bad:x?}");
    }
}

#[test]
fn bar_accesses_need_memory_decode_and_a_whole_bar() {
    let mut m = machine(2);
    let bar0 = m.bar(1, 0).unwrap();
    assert_eq!(
        m.read32(bar0 + 0x10),
        0xffff_ffff,
        "decode is off after reset"
    );
    m.enable_memory(1);
    assert_eq!(m.read32(bar0 + 0x10), 0x10);
    assert_eq!(m.read32(bar0 + 0xfffc), 0xfffc);
    let bar2 = m.bar(1, 2).unwrap();
    assert_eq!(m.read32(bar2 + 8), 0x0200_0008);
    let bar4 = m.bar(1, 4).unwrap();
    assert_eq!(m.read32(bar4 + 0x3fff_fffc), 0x0400_0000 | 0x3fff_fffc);
    // Slot 2 still has decode off.
    assert_eq!(m.read32(m.bar(2, 0).unwrap()), 0xffff_ffff);
    // Straddling the end of BAR 0, a gap, the end of the window.
    let mut b = [0u8; 8];
    m.w32.read(bar0 - W32 + 0xfffc, &mut b);
    assert_eq!(b, [0xff; 8]);
    let gap = W32 + 0x0800_0000;
    assert_eq!(m.read32(gap), 0xffff_ffff);
    m.w32.read(u64::MAX, &mut b[..1]);
    assert_eq!(b[0], 0xff);
    // Writes.
    m.w32.write(bar0 - W32 + 0x40, &[1, 2]);
    m.w32.write(gap - W32, &[1, 2]);
    m.w32.write(m.bar(2, 0).unwrap() - W32, &[1]);
    m.w64.write(bar4 - W64 + 8, &7u64.to_le_bytes());
    m.w64.write(u64::MAX, &[1]);
    assert_eq!(
        m.functions[0].lock().unwrap().writes,
        [(0, 0x40, vec![1, 2]), (4, 8, 7u64.to_le_bytes().to_vec())]
    );
    assert!(m.functions[1].lock().unwrap().writes.is_empty());
}

#[test]
fn a_guest_moves_a_bar_inside_the_window() {
    let mut m = machine(2);
    m.moves(1);
    m.enable_memory(1);
    let old = m.bar(1, 0).unwrap();
    let new = W32 + 0x0100_0000;
    m.ecam_write(1, 0x10, 4, new);
    assert_eq!(m.bar(1, 0), Some(new));
    assert_eq!(m.moves(1), [(0, Some(old), Some(new))]);
    assert_eq!(m.read32(new + 4), 4);
    assert_eq!(m.read32(old + 4), 0xffff_ffff);
    // A misaligned address is masked to the BAR's alignment by the register itself.
    m.ecam_write(1, 0x10, 4, new + 0x8123);
    assert_eq!(m.ecam_read(1, 0x10, 4), new);
    assert!(m.moves(1).is_empty(), "nothing moved");
    // A 64-bit BAR moves one half at a time; each half that changes the address moves it.
    let bar4 = m.bar(1, 4).unwrap();
    assert_eq!(bar4, W64);
    m.ecam_write(1, 0x24, 4, 3);
    assert_eq!(m.bar(1, 4), Some(3 << 32));
    m.ecam_write(1, 0x20, 4, 0x4000_0000);
    assert_eq!(m.bar(1, 4), Some((3 << 32) + 0x4000_0000));
    assert_eq!(
        m.moves(1),
        [
            (4, Some(bar4), Some(3 << 32)),
            (4, Some(3 << 32), Some((3 << 32) + 0x4000_0000))
        ]
    );
    // BAR 2 (64-bit, allocated low) moves above 4 GiB: the low half first makes it
    // 0x0_0000_0000 for a moment, which is refused.
    let high = W64 + (16 << 30);
    m.ecam_write(1, 0x18, 4, high);
    assert_eq!(m.bar(1, 2), None);
    m.ecam_write(1, 0x1c, 4, high >> 32);
    assert_eq!(m.bar(1, 2), Some(high));
    assert_eq!(m.read32(high + 0x10), 0x0200_0010);
    // A 1 GiB BAR at 0xc0000000 would reach past the 32-bit window.
    m.ecam_write(1, 0x24, 4, 0);
    m.ecam_write(1, 0x20, 4, 0xc000_0000);
    assert_eq!(m.bar(1, 4), None);
}

#[test]
fn a_bar_moved_over_another_or_outside_the_window_decodes_nowhere() {
    let mut m = machine(2);
    m.moves(1);
    m.moves(2);
    m.enable_memory(1);
    m.enable_memory(2);
    let a = m.bar(1, 0).unwrap();
    let b = m.bar(2, 0).unwrap();
    // Over slot 2's BAR 0.
    m.ecam_write(1, 0x10, 4, b);
    assert_eq!(
        m.ecam_read(1, 0x10, 4),
        b,
        "the register keeps what the guest wrote"
    );
    assert_eq!(m.bar(1, 0), None);
    assert_eq!(m.moves(1), [(0, Some(a), None)]);
    assert_eq!(m.read32(a), 0xffff_ffff, "not at the old place either");
    assert_eq!(m.bar(2, 0), Some(b), "the other BAR is untouched");
    assert!(m.moves(2).is_empty());
    {
        let f = m.functions[1].lock().unwrap();
        assert!(f.writes.is_empty());
    }
    m.w32.write(b - W32, &[9]);
    assert_eq!(
        m.functions[1].lock().unwrap().writes.len(),
        1,
        "slot 2 answers"
    );
    assert!(m.functions[0].lock().unwrap().writes.is_empty());
    // When slot 2's BAR moves away, slot 1's BAR takes the place it asked for.
    let elsewhere = W32 + 0x0200_0000;
    m.ecam_write(2, 0x10, 4, elsewhere);
    assert_eq!(m.bar(2, 0), Some(elsewhere));
    assert_eq!(m.bar(1, 0), Some(b));
    assert_eq!(m.moves(1), [(0, None, Some(b))]);
    // Outside the window: below it, in RAM, just past its end.
    for outside in [0x8000_0000u64, 0x10_0000, 0xdfff_0000 + 0x1_0000] {
        m.ecam_write(1, 0x10, 4, outside);
        assert_eq!(m.bar(1, 0), None, "{outside:#x}");
    }
    assert_eq!(m.read32(b), 0xffff_ffff);
    // Over a 64-bit BAR of its own function.
    let own = m.bar(1, 2).unwrap();
    m.ecam_write(1, 0x10, 4, own & !0xffff);
    assert_eq!(m.bar(1, 0), None);
    // Never a panic at the very top of the address space.
    m.ecam_write(1, 0x20, 4, 0xffff_ffff);
    m.ecam_write(1, 0x24, 4, 0xffff_ffff);
    assert_eq!(m.bar(1, 4), None);
}

#[test]
fn sizing_a_bar_with_decode_off_moves_it_once() {
    let mut m = machine(1);
    m.moves(1);
    let bar4 = m.bar(1, 4).unwrap();
    // Linux: decode off, all-ones to each half, read, restore, then decode on.
    let lo = m.ecam_read(1, 0x20, 4);
    let hi = m.ecam_read(1, 0x24, 4);
    m.ecam_write(1, 0x20, 4, 0xffff_ffff);
    let size_lo = m.ecam_read(1, 0x20, 4);
    m.ecam_write(1, 0x20, 4, lo);
    m.ecam_write(1, 0x24, 4, 0xffff_ffff);
    let size_hi = m.ecam_read(1, 0x24, 4);
    m.ecam_write(1, 0x24, 4, hi);
    assert_eq!(size_lo, 0xc000_000c, "1 GiB, 64-bit, prefetchable");
    assert_eq!(size_hi, 0xffff_ffff);
    assert_eq!(m.bar(1, 4), None, "changed while decode was off");
    assert_eq!(m.bar(1, 0), Some(W32), "untouched BARs stay");
    m.enable_memory(1);
    assert_eq!(m.bar(1, 4), Some(bar4));
    assert_eq!(
        m.moves(1),
        [(4, Some(bar4), None), (4, None, Some(bar4))],
        "ioeventfds leave once and come back once"
    );
    assert_eq!(m.read32(bar4 + 4), 0x0400_0004);
    // 32-bit BAR 0 sized and restored with decode on: it decodes nowhere in between.
    let bar0 = m.bar(1, 0).unwrap();
    m.ecam_write(1, 0x10, 4, 0xffff_ffff);
    assert_eq!(m.ecam_read(1, 0x10, 4), 0xffff_0000);
    assert_eq!(m.bar(1, 0), None);
    m.ecam_write(1, 0x10, 4, bar0);
    assert_eq!(m.bar(1, 0), Some(bar0));
    assert_eq!(m.read32(bar0), 0);
    // A BAR moved while decode is off goes to its new place when decode comes on.
    m.ecam_write(1, COMMAND, 2, 0);
    m.ecam_write(1, 0x10, 4, W32 + 0x10_0000);
    assert_eq!(m.bar(1, 0), None);
    m.enable_memory(1);
    assert_eq!(m.bar(1, 0), Some(W32 + 0x10_0000));
}
