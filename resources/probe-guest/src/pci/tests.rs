//! Unit tests of the PCI parsers against a fake configuration space.

use super::*;
use crate::phys::TestMem;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::vec::Vec;

fn bdf(dev: u8, func: u8) -> Bdf {
    Bdf::new(0, dev, func).unwrap_or_else(|| unreachable!())
}

/// One function of the fake bus: its bytes, and which bits of each BAR register software can
/// write (the rest read back as they are).
#[derive(Clone)]
struct FakeFn {
    cfg: [u8; CONFIG_SPACE_LEN],
    bar_masks: [u32; 6],
    /// Writes to BARs are dropped after sizing (a device that does not restore).
    sticky_bars: bool,
    /// The command register at each BAR write.
    command_at_bar_writes: Vec<u16>,
}

#[derive(Default)]
struct FakeBus(RefCell<BTreeMap<(u8, u8), FakeFn>>);

impl FakeBus {
    fn add(&self, dev: u8, func: u8, f: FakeFn) {
        self.0.borrow_mut().insert((dev, func), f);
    }

    fn get(&self, dev: u8, func: u8) -> FakeFn {
        self.0.borrow()[&(dev, func)].clone()
    }
}

impl ConfigAccess for FakeBus {
    fn read_u32(&self, bdf: Bdf, offset: u16) -> u32 {
        assert!(offset.is_multiple_of(4) && offset < 256);
        match self.0.borrow().get(&(bdf.dev, bdf.func)) {
            Some(f) if bdf.bus == 0 => ConfigSpace(f.cfg).u32(usize::from(offset)),
            _ => u32::MAX,
        }
    }

    fn write_u32(&self, bdf: Bdf, offset: u16, value: u32) {
        let mut fns = self.0.borrow_mut();
        let Some(f) = fns.get_mut(&(bdf.dev, bdf.func)) else {
            return;
        };
        let o = usize::from(offset);
        let old = ConfigSpace(f.cfg).u32(o);
        let new = match offset {
            0x10..=0x24 => {
                let i = usize::from(offset - 0x10) / 4;
                f.command_at_bar_writes.push(ConfigSpace(f.cfg).command());
                if f.sticky_bars && value != u32::MAX {
                    return;
                }
                (value & f.bar_masks[i]) | (old & !f.bar_masks[i])
            }
            // Command is writable; status is write-1-to-clear (not modelled: kept).
            0x04 => (old & 0xffff_0000) | (value & 0xffff),
            0x00 | 0x08 | 0x0c => old,
            _ => value,
        };
        f.cfg[o..o + 4].copy_from_slice(&new.to_le_bytes());
    }
}

fn put16(cfg: &mut [u8; 256], at: usize, v: u16) {
    cfg[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(cfg: &mut [u8; 256], at: usize, v: u32) {
    cfg[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A virtio capability at `at` pointing to `next`.
fn virtio_cap_bytes(
    cfg: &mut [u8; 256],
    at: usize,
    next: u8,
    cfg_type: u8,
    (bar, offset, length): (u8, u32, u32),
    extra: Option<u32>,
) {
    cfg[at] = CAP_VENDOR;
    cfg[at + 1] = next;
    cfg[at + 2] = if extra.is_some() { 20 } else { 16 };
    cfg[at + 3] = cfg_type;
    cfg[at + 4] = bar;
    put32(cfg, at + 8, offset);
    put32(cfg, at + 12, length);
    if let Some(x) = extra {
        put32(cfg, at + 16, x);
    }
}

/// What cgvm builds for a virtio-blk device: 1af4:1042 rev 1, BAR0 64-bit 16 KiB at `base`;
/// MSI-X (3 vectors, table at 0x2000, PBA at 0x3000) at 0x40, then COMMON (0x0, 0x38), ISR
/// (0x1000, 1), NOTIFY (0x1800, 0x800, multiplier 4), DEVICE (0x800, 0x100), PCI_CFG.
fn virtio_blk(base: u32) -> FakeFn {
    let mut cfg = [0u8; 256];
    put16(&mut cfg, 0, VENDOR_VIRTIO);
    put16(&mut cfg, 2, 0x1042);
    put16(&mut cfg, 4, COMMAND_MEMORY);
    put16(&mut cfg, 6, STATUS_CAP_LIST);
    cfg[0x08] = 1;
    cfg[0x0b] = 0x01;
    cfg[0x0a] = 0x80;
    put32(&mut cfg, 0x10, base | 0x4);
    put32(&mut cfg, 0x14, 0);
    put16(&mut cfg, 0x2c, VENDOR_VIRTIO);
    put16(&mut cfg, 0x2e, 0x40);
    cfg[0x34] = 0x40;
    // MSI-X: 3 entries.
    cfg[0x40] = CAP_MSIX;
    cfg[0x41] = 0x4c;
    put16(&mut cfg, 0x42, 2);
    put32(&mut cfg, 0x44, 0x2000);
    put32(&mut cfg, 0x48, 0x3000);
    virtio_cap_bytes(&mut cfg, 0x4c, 0x5c, VIRTIO_CAP_COMMON, (0, 0, 0x38), None);
    virtio_cap_bytes(&mut cfg, 0x5c, 0x6c, VIRTIO_CAP_ISR, (0, 0x1000, 1), None);
    virtio_cap_bytes(
        &mut cfg,
        0x6c,
        0x80,
        VIRTIO_CAP_NOTIFY,
        (0, 0x1800, 0x800),
        Some(4),
    );
    virtio_cap_bytes(
        &mut cfg,
        0x80,
        0x90,
        VIRTIO_CAP_DEVICE,
        (0, 0x800, 0x100),
        None,
    );
    virtio_cap_bytes(&mut cfg, 0x90, 0, VIRTIO_CAP_PCI_CFG, (0, 0, 0), Some(0));
    FakeFn {
        cfg,
        bar_masks: [!0x3fff, u32::MAX, 0, 0, 0, 0],
        sticky_bars: false,
        command_at_bar_writes: Vec::new(),
    }
}

fn host_bridge(multi: bool) -> FakeFn {
    let mut cfg = [0u8; 256];
    put16(&mut cfg, 0, 0x8086);
    put16(&mut cfg, 2, 0x0d57);
    cfg[0x0b] = 0x06;
    cfg[0x0e] = if multi { HEADER_MULTI_FUNCTION } else { 0 };
    FakeFn {
        cfg,
        bar_masks: [0; 6],
        sticky_bars: false,
        command_at_bar_writes: Vec::new(),
    }
}

#[test]
fn cf8_addresses() {
    assert_eq!(cf8_address(bdf(0, 0), 0), Some(0x8000_0000));
    assert_eq!(cf8_address(bdf(1, 0), 0), Some(0x8000_0800));
    assert_eq!(cf8_address(bdf(1, 0), 0x10), Some(0x8000_0810));
    assert_eq!(cf8_address(bdf(31, 7), 0xfc), Some(0x8000_fffc));
    let b = Bdf::new(5, 2, 3).unwrap_or_else(|| unreachable!());
    assert_eq!(cf8_address(b, 4), Some(0x8005_1304));
    // Past the 256 bytes, not a dword, or a device/function out of range.
    assert_eq!(cf8_address(bdf(1, 0), 0x100), None);
    assert_eq!(cf8_address(bdf(1, 0), 2), None);
    let bad = Bdf {
        bus: 0,
        dev: 32,
        func: 0,
    };
    assert_eq!(cf8_address(bad, 0), None);
    assert!(Bdf::new(0, 32, 0).is_none());
    assert!(Bdf::new(0, 0, 8).is_none());
}

#[test]
fn ecam_offsets() {
    assert_eq!(ecam_offset(0, bdf(0, 0), 0), Some(0));
    assert_eq!(ecam_offset(0, bdf(1, 0), 0), Some(0x8000));
    assert_eq!(ecam_offset(0, bdf(1, 2), 0x10), Some(0xa010));
    assert_eq!(ecam_offset(0, bdf(31, 7), 0xffc), Some(0xf_fffc));
    let b1 = Bdf::new(1, 0, 0).unwrap_or_else(|| unreachable!());
    assert_eq!(ecam_offset(0, b1, 0), Some(0x10_0000));
    assert_eq!(ecam_offset(1, b1, 0), Some(0));
    assert_eq!(ecam_offset(1, bdf(0, 0), 0), None, "bus below the first");
    assert_eq!(ecam_offset(0, bdf(0, 0), 4096), None);

    let e = Ecam::new(0xe000_0000, 0, 0).unwrap_or_else(|| unreachable!());
    assert_eq!(e.base(), 0xe000_0000);
    assert_eq!(e.offset(bdf(1, 0), 0x34), Some(0x8034));
    assert_eq!(e.offset(b1, 0), None, "bus 1 is not decoded");
    assert_eq!(
        e.offset(bdf(1, 0), 0x100),
        None,
        "the probe reads 256 bytes"
    );
    assert!(Ecam::new(0xfff0_0000, 0, 0).is_some());
    assert!(Ecam::new(0xfff0_0000, 0, 1).is_none(), "past 4 GiB");
    assert!(Ecam::new(0x8000_0000, 0, 0).is_none(), "in RAM");
    assert!(Ecam::new(0xe000_0000, 1, 0).is_none(), "no buses");
}

#[test]
fn header_fields() {
    let f = virtio_blk(0xd000_0000);
    let cfg = ConfigSpace(f.cfg);
    assert_eq!(cfg.vendor(), 0x1af4);
    assert_eq!(cfg.device(), 0x1042);
    assert_eq!(cfg.revision(), 1);
    assert_eq!(cfg.class(), (0x01, 0x80, 0x00));
    assert_eq!(cfg.header_layout(), 0);
    assert!(!cfg.multi_function());
    assert_eq!(cfg.command(), COMMAND_MEMORY);
    assert_eq!(cfg.bar_raw(0), 0xd000_0004);
    assert_eq!(cfg.u8(300), 0xff);
    let bridge = ConfigSpace(host_bridge(true).cfg);
    assert_eq!(bridge.class(), (0x06, 0x00, 0x00));
    assert!(bridge.multi_function());
    assert_eq!(bridge.header_layout(), 0);
    let mut other = cfg;
    assert_eq!(cfg.first_difference(&other), None);
    other.0[0x91] ^= 1;
    assert_eq!(cfg.first_difference(&other), Some(0x91));
}

#[test]
fn bars_decode() {
    let mut cfg = [0u8; 256];
    put32(&mut cfg, 0x10, 0xd000_000c); // 64-bit prefetchable
    put32(&mut cfg, 0x14, 0x0000_0001);
    put32(&mut cfg, 0x18, 0xc101); // I/O
    put32(&mut cfg, 0x1c, 0xd800_0000); // 32-bit
    put32(&mut cfg, 0x20, 0xd900_0002); // type 1: reserved
    put32(&mut cfg, 0x24, 0xda00_0004); // 64-bit in the last register
    let bars = decode_bars(&ConfigSpace(cfg));
    assert_eq!(
        bars,
        [
            Bar::Mem64 {
                base: 0x1_d000_0000,
                prefetchable: true
            },
            Bar::Upper,
            Bar::Io(0xc100),
            Bar::Mem32 {
                base: 0xd800_0000,
                prefetchable: false
            },
            Bar::Bad(0xd900_0002),
            Bar::Bad(0xda00_0004),
        ]
    );
    assert_eq!(bars[0].memory_base(), Some(0x1_d000_0000));
    assert_eq!(bars[2].memory_base(), None);
    assert_eq!(decode_bars(&ConfigSpace([0; 256])), [Bar::Empty; 6]);
}

#[test]
fn bar_size_arithmetic() {
    // 64-bit, 16 KiB: the low register keeps its type bits.
    assert_eq!(memory_bar_size(0xffff_c00c, Some(u32::MAX)), Ok(0x4000));
    assert_eq!(memory_bar_size(0xffff_c004, Some(u32::MAX)), Ok(0x4000));
    // 64-bit, 4 GiB and 8 GiB.
    assert_eq!(memory_bar_size(0x0000_0004, Some(u32::MAX)), Ok(1 << 32));
    assert_eq!(memory_bar_size(0x0000_0004, Some(0xffff_fffe)), Ok(1 << 33));
    // 32-bit, 4 KiB and 2 GiB.
    assert_eq!(memory_bar_size(0xffff_f000, None), Ok(0x1000));
    assert_eq!(memory_bar_size(0x8000_0008, None), Ok(0x8000_0000));
    // Nothing writable.
    assert_eq!(
        memory_bar_size(0x0000_0000, None),
        Err(SizeError::Unimplemented)
    );
    assert_eq!(
        memory_bar_size(0x0000_0004, Some(0)),
        Err(SizeError::Unimplemented)
    );
    // Holes in the mask: no power-of-two size.
    assert_eq!(
        memory_bar_size(0xfff0_f000, None),
        Err(SizeError::NotContiguous(0xffff_ffff_fff0_f000))
    );
    assert_eq!(
        memory_bar_size(0xffff_c004, Some(0x7fff_ffff)),
        Err(SizeError::NotContiguous(0x7fff_ffff_ffff_c000))
    );
    // I/O: 32 ports, with or without the upper 16 bits.
    assert_eq!(io_bar_size(0xffff_ffe1), Ok(32));
    assert_eq!(io_bar_size(0x0000_ffe1), Ok(32));
    assert_eq!(io_bar_size(0x0000_0001), Err(SizeError::Unimplemented));
    assert!(matches!(
        io_bar_size(0x0000_fee1),
        Err(SizeError::NotContiguous(_))
    ));
}

#[test]
fn sizing_restores_and_turns_decode_off() {
    let bus = FakeBus::default();
    bus.add(1, 0, virtio_blk(0xd000_0000));
    let cfg = ConfigSpace::read(&bus, bdf(1, 0));
    let sizes = size_bars(&bus, bdf(1, 0), &cfg);
    assert_eq!(sizes.command, COMMAND_MEMORY);
    assert_eq!(sizes.command_not_restored, None);
    assert_eq!(sizes.bars[0].size, Ok(0x4000));
    assert_eq!(sizes.bars[0].mask, (0xffff_c004, u32::MAX));
    assert_eq!(sizes.bars[0].not_restored, None);
    assert_eq!(sizes.bars[1].bar, Bar::Upper);
    for b in &sizes.bars[2..] {
        assert_eq!(b.size, Err(SizeError::Unimplemented));
    }
    let after = bus.get(1, 0);
    assert_eq!(ConfigSpace(after.cfg), cfg, "everything back as it was");
    assert!(!after.command_at_bar_writes.is_empty());
    assert!(
        after
            .command_at_bar_writes
            .iter()
            .all(|c| c & (COMMAND_MEMORY | COMMAND_IO) == 0),
        "decode off while sizing: {:?}",
        after.command_at_bar_writes
    );

    // A device that keeps the all-ones.
    let mut sticky = virtio_blk(0xd000_4000);
    sticky.sticky_bars = true;
    bus.add(2, 0, sticky);
    let cfg = ConfigSpace::read(&bus, bdf(2, 0));
    let sizes = size_bars(&bus, bdf(2, 0), &cfg);
    assert_eq!(sizes.bars[0].size, Ok(0x4000));
    assert_eq!(
        sizes.bars[0].not_restored,
        Some((0x10, 0xd000_4004, 0xffff_c004))
    );
}

#[test]
fn capability_lists() {
    let cfg = ConfigSpace(virtio_blk(0xd000_0000).cfg);
    let caps = capabilities(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let offsets: Vec<(u8, u8)> = caps.as_slice().iter().map(|c| (c.offset, c.id)).collect();
    assert_eq!(
        offsets,
        [
            (0x40, CAP_MSIX),
            (0x4c, CAP_VENDOR),
            (0x5c, CAP_VENDOR),
            (0x6c, CAP_VENDOR),
            (0x80, CAP_VENDOR),
            (0x90, CAP_VENDOR)
        ]
    );

    // No list without the status bit, whatever the pointer says.
    let mut no_list = cfg;
    put16(&mut no_list.0, 6, 0);
    assert_eq!(capabilities(&no_list).map(|c| c.as_slice().len()), Ok(0));

    // A capability pointing at itself; two pointing at each other.
    let mut self_loop = cfg;
    self_loop.0[0x5d] = 0x5c;
    assert_eq!(
        capabilities(&self_loop),
        Err(CapError::Loop {
            from: 0x5d,
            to: 0x5c
        })
    );
    let mut back = cfg;
    back.0[0x91] = 0x40;
    assert_eq!(
        capabilities(&back),
        Err(CapError::Loop {
            from: 0x91,
            to: 0x40
        })
    );

    // Pointers into the header, past 0xfc, unaligned.
    for (at, to) in [(0x34, 0x10), (0x41, 0x3c), (0x6d, 0xfe), (0x81, 0x91)] {
        let mut bad = cfg;
        bad.0[at] = to;
        assert_eq!(
            capabilities(&bad),
            Err(CapError::Pointer { from: at as u8, to }),
            "{at:#x} -> {to:#x}"
        );
    }

    // The longest list: every dword from 0x40 to 0xfc, in reverse order; it ends at 0.
    let mut full = ConfigSpace([0; 256]);
    put16(&mut full.0, 6, STATUS_CAP_LIST);
    full.0[0x34] = 0xfc;
    for at in (0x40..=0xfcusize).step_by(4) {
        full.0[at] = 0x01;
        full.0[at + 1] = if at == 0x40 { 0 } else { (at - 4) as u8 };
    }
    assert_eq!(
        capabilities(&full).map(|c| c.as_slice().len()),
        Ok(MAX_CAPS)
    );
    // ... and with the last one pointing back at the first: a loop, not an overflow.
    full.0[0x41] = 0xfc;
    assert_eq!(
        capabilities(&full),
        Err(CapError::Loop {
            from: 0x41,
            to: 0xfc
        })
    );
}

#[test]
fn virtio_capabilities() {
    let cfg = ConfigSpace(virtio_blk(0xd000_0000).cfg);
    let caps = capabilities(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let layout = virtio_layout(&cfg, &caps).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        layout,
        VirtioLayout {
            common: Region {
                bar: 0,
                offset: 0,
                length: 0x38
            },
            notify: Region {
                bar: 0,
                offset: 0x1800,
                length: 0x800
            },
            notify_mult: 4,
            isr: Region {
                bar: 0,
                offset: 0x1000,
                length: 1
            },
            device: Some(Region {
                bar: 0,
                offset: 0x800,
                length: 0x100
            }),
            pci_cfg: Some(0x90),
        }
    );

    // A notify capability too short for its multiplier.
    let mut short = cfg;
    short.0[0x6e] = 16;
    assert_eq!(
        virtio_layout(&short, &caps),
        Err(VirtioCapError::Short {
            at: 0x6c,
            len: 16,
            need: 20
        })
    );
    // One that runs past the 256 bytes.
    let mut past = cfg;
    past.0[0x92] = 0x80;
    assert_eq!(
        virtio_cap(&past, 0x90),
        Err(VirtioCapError::PastEnd {
            at: 0x90,
            len: 0x80
        })
    );
    // No COMMON_CFG: the one there names BAR 7 (reserved), so it is skipped.
    let mut reserved_bar = cfg;
    reserved_bar.0[0x50] = 7;
    assert_eq!(
        virtio_layout(&reserved_bar, &caps),
        Err(VirtioCapError::Missing(VIRTIO_CAP_COMMON))
    );
    // A second ISR capability later in the list does not replace the first.
    let mut two = cfg;
    two.0[0x83] = VIRTIO_CAP_ISR;
    let l = virtio_layout(&two, &caps).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(l.isr.offset, 0x1000);
    assert_eq!(l.device, None);

    let r = Region {
        bar: 0,
        offset: 0x1000,
        length: 0x10,
    };
    assert!(r.overlaps(&Region {
        bar: 0,
        offset: 0x100f,
        length: 1
    }));
    assert!(!r.overlaps(&Region {
        bar: 0,
        offset: 0x1010,
        length: 1
    }));
    assert!(!r.overlaps(&Region {
        bar: 1,
        offset: 0x1000,
        length: 1
    }));
    assert_eq!(
        Region {
            bar: 0,
            offset: u32::MAX,
            length: u32::MAX
        }
        .end(),
        0x1_ffff_fffe
    );
}

#[test]
fn msix_capability() {
    let cfg = ConfigSpace(virtio_blk(0xd000_0000).cfg);
    let m = msix(&cfg, 0x40).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.table_size, 3);
    assert_eq!(
        m.table,
        Region {
            bar: 0,
            offset: 0x2000,
            length: 48
        }
    );
    assert_eq!(
        m.pba,
        Region {
            bar: 0,
            offset: 0x3000,
            length: 8
        }
    );
    let mut big = cfg;
    put16(&mut big.0, 0x42, 0x7ff | MSIX_ENABLE | MSIX_FUNCTION_MASK);
    put32(&mut big.0, 0x44, 0x1_0002);
    put32(&mut big.0, 0x48, 0x2_0005);
    let m = msix(&big, 0x40).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.table_size, 2048);
    assert_eq!(m.control, 0xc7ff);
    assert_eq!(
        (m.table.bar, m.table.offset, m.table.length),
        (2, 0x1_0000, 32768)
    );
    assert_eq!((m.pba.bar, m.pba.offset, m.pba.length), (5, 0x2_0000, 256));
    assert_eq!(msix(&cfg, 0xf8), Err(MsixPastEnd(0xf8)));
}

#[test]
fn virtio_functions() {
    let cfg = ConfigSpace(virtio_blk(0xd000_0000).cfg);
    let f = VirtioFunction::parse(bdf(1, 0), &cfg)
        .unwrap_or_else(|| panic!("not virtio"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.device_type, 2);
    assert_eq!(f.type_name(), "blk");
    assert_eq!(f.address(&f.layout.notify), Some(0xd000_1800));
    assert_eq!(f.msix.map(|m| m.table_size), Some(3));
    let regs = f.regs(&f.layout.common).unwrap_or_else(|| unreachable!());
    assert_eq!((regs.base(), regs.len()), (0xd000_0000, 0x38));
    // A region in a BAR that is not memory.
    assert_eq!(
        f.address(&Region {
            bar: 2,
            offset: 0,
            length: 4
        }),
        None
    );

    // Another vendor's device is not ours; a transitional or revision-0 device is refused.
    assert!(VirtioFunction::parse(bdf(0, 0), &ConfigSpace(host_bridge(false).cfg)).is_none());
    let mut legacy = cfg;
    put16(&mut legacy.0, 2, 0x1001);
    assert_eq!(
        VirtioFunction::parse(bdf(1, 0), &legacy),
        Some(Err(VirtioPciError::Transitional(0x1001)))
    );
    let mut rev0 = cfg;
    rev0.0[8] = 0;
    assert_eq!(
        VirtioFunction::parse(bdf(1, 0), &rev0),
        Some(Err(VirtioPciError::Revision0))
    );
    let mut looped = cfg;
    looped.0[0x91] = 0x4c;
    assert!(matches!(
        VirtioFunction::parse(bdf(1, 0), &looped),
        Some(Err(VirtioPciError::Caps(CapError::Loop { .. })))
    ));
    // Above 4 GiB: described, but not reachable.
    let mut high = cfg;
    put32(&mut high.0, 0x14, 1);
    let f = VirtioFunction::parse(bdf(1, 0), &high)
        .unwrap_or_else(|| unreachable!())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.address(&f.layout.common), Some(0x1_d000_0000));
    assert_eq!(f.regs(&f.layout.common), None);

    assert_eq!(modern_virtio_type(0x1af4, 0x1053), Some(19));
    assert_eq!(modern_virtio_type(0x1af4, 0x1000), None);
    assert_eq!(modern_virtio_type(0x8086, 0x1041), None);
    assert_eq!(virtio_type_name(19), Some("vsock"));
    assert_eq!(virtio_type_name(63), None);
}

#[test]
fn enumeration_follows_the_multi_function_bit() {
    let bus = FakeBus::default();
    bus.add(0, 0, host_bridge(false));
    bus.add(1, 0, virtio_blk(0xd000_0000));
    // Device 2: multi-function, functions 0 and 3.
    bus.add(2, 0, host_bridge(true));
    bus.add(2, 3, virtio_blk(0xd000_4000));
    // Device 3: a function 1 without the bit on function 0: not found.
    bus.add(3, 0, host_bridge(false));
    bus.add(3, 1, virtio_blk(0xd000_8000));
    // Device 4: function 2 without a function 0: not found.
    bus.add(4, 2, virtio_blk(0xd000_c000));
    let mut found = Vec::new();
    enumerate(&bus, 0, |b, id| found.push((b, id)));
    assert_eq!(
        found,
        [
            (bdf(0, 0), 0x0d57_8086),
            (bdf(1, 0), 0x1042_1af4),
            (bdf(2, 0), 0x0d57_8086),
            (bdf(2, 3), 0x1042_1af4),
            (bdf(3, 0), 0x0d57_8086),
        ]
    );
    assert_eq!(Bdf::all_on(0).count(), 256);
    assert_eq!(Bdf::all_on(0).nth(9), Some(bdf(1, 1)));
    assert_eq!(std::format!("{}", bdf(31, 7)), "00:1f.7");
}

/// An MCFG table with `entries` (base, segment, first bus, last bus).
fn mcfg_table(entries: &[(u64, u16, u8, u8)]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(b"MCFG");
    let len = (MCFG_ENTRIES + MCFG_ENTRY_LEN * entries.len()) as u32;
    t.extend_from_slice(&len.to_le_bytes());
    t.push(1); // revision
    t.push(0); // checksum
    t.extend_from_slice(b"CGVM  CGVMMCFG");
    t.extend_from_slice(&[0; 8]); // OEM revision, creator id
    t.extend_from_slice(&[0; 4]); // creator revision
    t.extend_from_slice(&[0; 8]); // reserved
    assert_eq!(t.len(), MCFG_ENTRIES);
    for &(base, seg, first, last) in entries {
        t.extend_from_slice(&base.to_le_bytes());
        t.extend_from_slice(&seg.to_le_bytes());
        t.push(first);
        t.push(last);
        t.extend_from_slice(&[0; 4]);
    }
    let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    t[9] = sum.wrapping_neg();
    t
}

#[test]
fn mcfg_parsing() {
    let m = parse_mcfg(&mcfg_table(&[(0xe000_0000, 0, 0, 0)])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        m.entries(),
        [McfgEntry {
            base: 0xe000_0000,
            segment: 0,
            first_bus: 0,
            last_bus: 0
        }]
    );
    assert_eq!(m.bus0().map(|e| e.base), Some(0xe000_0000));

    let two = parse_mcfg(&mcfg_table(&[
        (0xb000_0000, 1, 0, 255),
        (0xe000_0000, 0, 0, 3),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(two.entries().len(), 2);
    assert_eq!(
        two.bus0().map(|e| e.segment),
        Some(0),
        "segment 0's, not the first"
    );
    let later =
        parse_mcfg(&mcfg_table(&[(0xe000_0000, 0, 4, 7)])).unwrap_or_else(|e| panic!("{e}"));
    assert!(later.bus0().is_none());

    assert_eq!(parse_mcfg(&mcfg_table(&[])), Err(McfgError::Empty));
    let mut cut = mcfg_table(&[(0xe000_0000, 0, 0, 0)]);
    cut.pop();
    assert_eq!(parse_mcfg(&cut), Err(McfgError::Length(59)));
    assert_eq!(parse_mcfg(&cut[..20]), Err(McfgError::Length(20)));
    let many: Vec<_> = (0..9).map(|i| (0xe000_0000, i, 0, 0)).collect();
    assert_eq!(parse_mcfg(&mcfg_table(&many)), Err(McfgError::TooMany(9)));
    let backwards = parse_mcfg(&mcfg_table(&[(0xe000_0000, 0, 2, 1)]));
    assert!(matches!(backwards, Err(McfgError::Buses(_))));
}

/// ACPI tables in a test memory: an RSDP (revision 2) at 0xe0000, an XSDT at 0x1000 listing
/// `tables`, each placed from 0x2000 on.
fn acpi_with(tables: &[Vec<u8>]) -> TestMem {
    let mut mem = TestMem::new(0, 0x10_0000);
    let mut xsdt = Vec::new();
    xsdt.extend_from_slice(b"XSDT");
    let len = 36 + 8 * tables.len() as u32;
    xsdt.extend_from_slice(&len.to_le_bytes());
    xsdt.extend_from_slice(&[1, 0]);
    xsdt.extend_from_slice(b"CGVM  CGVMXSDT");
    xsdt.extend_from_slice(&[0; 12]);
    let mut at = 0x2000u64;
    for t in tables {
        xsdt.extend_from_slice(&at.to_le_bytes());
        mem.write(at, t);
        at += 0x1000;
    }
    let sum = xsdt.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    xsdt[9] = sum.wrapping_neg();
    mem.write(0x1000, &xsdt);
    let mut rsdp = Vec::new();
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(b"CGVM  ");
    rsdp.push(2);
    rsdp.extend_from_slice(&0u32.to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&0x1000u64.to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]);
    let sum = rsdp[..20].iter().fold(0u8, |s, &b| s.wrapping_add(b));
    rsdp[8] = sum.wrapping_neg();
    let sum = rsdp.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    rsdp[32] = sum.wrapping_neg();
    mem.write(0xe0000, &rsdp);
    mem
}

#[test]
fn mcfg_is_found_through_the_xsdt() {
    let mut other = mcfg_table(&[]);
    other[..4].copy_from_slice(b"HPET");
    let sum = other.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    other[9] = other[9].wrapping_sub(sum);
    let mem = acpi_with(&[other.clone(), mcfg_table(&[(0xe000_0000, 0, 0, 0)])]);
    let m = find_mcfg(&mem, 0xe0000)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no MCFG"));
    assert_eq!(m.bus0().map(|e| e.base), Some(0xe000_0000));
    // Found by the scan too.
    assert!(matches!(find_mcfg(&mem, 0), Ok(Some(_))));
    // No MCFG listed.
    assert_eq!(find_mcfg(&acpi_with(&[other]), 0), Ok(None));
    // A bad checksum is an ACPI error.
    let mut bad = mcfg_table(&[(0xe000_0000, 0, 0, 0)]);
    bad[9] ^= 1;
    assert!(matches!(
        find_mcfg(&acpi_with(&[bad]), 0),
        Err(McfgReadError::Acpi(AcpiError::TableChecksum(..)))
    ));
    // Too many allocations for the probe's buffer.
    let many: Vec<_> = (0..12).map(|i| (0xe000_0000, i, 0, 0)).collect();
    assert_eq!(
        find_mcfg(&acpi_with(&[mcfg_table(&many)]), 0),
        Err(McfgReadError::Mcfg(McfgError::TooMany(12)))
    );
}
