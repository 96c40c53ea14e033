//! Unit tests of the virtio-mmio discovery: command-line entries, the DSDT scan on a real
//! cgvm DSDT and on iasl-compiled AML, and the comparison of the two lists.

use super::*;
use std::vec::Vec;

/// The DSDT cgvm builds (`boot::acpi::create_acpi_tables`) for three virtio-mmio devices at
/// 0xc0001000, 0xc0002000, 0xc0003000 (4 KiB each) with IRQs 5, 6, 7: devices `VR00`..`VR02`
/// in `\_SB_` after COM1, RTC, KBD, PEVT and MRES, each with `_HID` "LNRO0005", `_UID`,
/// `_CCA` and a `_CRS` of Memory32Fixed + Extended Interrupt (edge, active high).
const CGVM_DSDT: [u8; 516] = [
    0x44, 0x53, 0x44, 0x54, 0x04, 0x02, 0x00, 0x00, 0x02, 0x69, 0x43, 0x47, 0x56, 0x4d, 0x20, 0x20,
    0x43, 0x47, 0x56, 0x4d, 0x44, 0x53, 0x44, 0x54, 0x01, 0x00, 0x00, 0x00, 0x52, 0x56, 0x41, 0x54,
    0x00, 0x00, 0x00, 0x01, 0x10, 0x41, 0x1d, 0x5c, 0x5f, 0x53, 0x42, 0x5f, 0x5b, 0x82, 0x31, 0x43,
    0x4f, 0x4d, 0x31, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0c, 0x41, 0xd0, 0x05, 0x01, 0x08, 0x5f, 0x55,
    0x49, 0x44, 0x00, 0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x16, 0x0a, 0x13, 0x47, 0x01, 0xf8, 0x03,
    0xf8, 0x03, 0x01, 0x08, 0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00, 0x79, 0x00, 0x5b,
    0x82, 0x22, 0x52, 0x54, 0x43, 0x5f, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0c, 0x41, 0xd0, 0x0b, 0x00,
    0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x0d, 0x0a, 0x0a, 0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01,
    0x02, 0x79, 0x00, 0x5b, 0x82, 0x33, 0x4b, 0x42, 0x44, 0x5f, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0c,
    0x41, 0xd0, 0x03, 0x03, 0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x1e, 0x0a, 0x1b, 0x47, 0x01, 0x60,
    0x00, 0x60, 0x00, 0x01, 0x01, 0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01, 0x89, 0x06, 0x00,
    0x03, 0x01, 0x01, 0x00, 0x00, 0x00, 0x79, 0x00, 0x5b, 0x82, 0x34, 0x50, 0x45, 0x56, 0x54, 0x08,
    0x5f, 0x48, 0x49, 0x44, 0x0d, 0x51, 0x45, 0x4d, 0x55, 0x30, 0x30, 0x30, 0x31, 0x00, 0x08, 0x5f,
    0x55, 0x49, 0x44, 0x00, 0x08, 0x5f, 0x53, 0x54, 0x41, 0x0a, 0x0f, 0x08, 0x5f, 0x43, 0x52, 0x53,
    0x11, 0x0d, 0x0a, 0x0a, 0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01, 0x79, 0x00, 0x5b, 0x82,
    0x3c, 0x4d, 0x52, 0x45, 0x53, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0c, 0x41, 0xd0, 0x0c, 0x02, 0x08,
    0x5f, 0x55, 0x49, 0x44, 0x00, 0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x21, 0x0a, 0x1e, 0x47, 0x01,
    0xf4, 0x00, 0xf4, 0x00, 0x01, 0x01, 0x47, 0x01, 0xc0, 0x03, 0xc0, 0x03, 0x01, 0x03, 0x86, 0x09,
    0x00, 0x01, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00, 0x79, 0x00, 0x5b, 0x82, 0x41, 0x04,
    0x56, 0x52, 0x30, 0x30, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0d, 0x4c, 0x4e, 0x52, 0x4f, 0x30, 0x30,
    0x30, 0x35, 0x00, 0x08, 0x5f, 0x55, 0x49, 0x44, 0x00, 0x08, 0x5f, 0x43, 0x43, 0x41, 0x01, 0x08,
    0x5f, 0x43, 0x52, 0x53, 0x11, 0x1a, 0x0a, 0x17, 0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xc0,
    0x00, 0x10, 0x00, 0x00, 0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00, 0x79, 0x00, 0x5b,
    0x82, 0x41, 0x04, 0x56, 0x52, 0x30, 0x31, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0d, 0x4c, 0x4e, 0x52,
    0x4f, 0x30, 0x30, 0x30, 0x35, 0x00, 0x08, 0x5f, 0x55, 0x49, 0x44, 0x01, 0x08, 0x5f, 0x43, 0x43,
    0x41, 0x01, 0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x1a, 0x0a, 0x17, 0x86, 0x09, 0x00, 0x01, 0x00,
    0x20, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00, 0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00,
    0x79, 0x00, 0x5b, 0x82, 0x42, 0x04, 0x56, 0x52, 0x30, 0x32, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0d,
    0x4c, 0x4e, 0x52, 0x4f, 0x30, 0x30, 0x30, 0x35, 0x00, 0x08, 0x5f, 0x55, 0x49, 0x44, 0x0a, 0x02,
    0x08, 0x5f, 0x43, 0x43, 0x41, 0x01, 0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x1a, 0x0a, 0x17, 0x86,
    0x09, 0x00, 0x01, 0x00, 0x30, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00, 0x89, 0x06, 0x00, 0x03, 0x01,
    0x07, 0x00, 0x00, 0x00, 0x79, 0x00, 0x08, 0x5c, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x07, 0x04, 0x0a,
    0x05, 0x00, 0x00, 0x00,
];

/// `iasl` output for this ASL (a whole DSDT, header included):
///
/// ```text
/// Scope (\_SB) {
///     Device (PCI0) {
///         Name (_HID, EisaId ("PNP0A08"))
///         Method (_STA, 0, NotSerialized) { Return (0x0F) }
///         Device (VRIN) {                       // nested in a non-virtio device
///             Name (_HID, "LNRO0005")
///             Name (_CRS, ResourceTemplate () {
///                 Memory32Fixed (ReadWrite, 0xD0000000, 0x00000200)
///                 IRQNoFlags () {11}            // small IRQ descriptor
///             })
///         }
///     }
///     Device (VR10) {                           // _CRS before _HID, two interrupts
///         Name (_CRS, ResourceTemplate () {
///             Memory32Fixed (ReadWrite, 0xD0001000, 0x00001000)
///             Interrupt (ResourceConsumer, Level, ActiveHigh, Shared, ,, ) {12, 13}
///         })
///         Name (_UID, 0x10)
///         Name (_HID, "LNRO0005")
///     }
///     Device (NOTV) {                           // another _HID: not a virtio device
///         Name (_HID, "LNRO0006")
///         Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xD0002000, 0x1000) })
///     }
/// }
/// ```
const IASL_AML: [u8; 229] = [
    0x44, 0x53, 0x44, 0x54, 0xe5, 0x00, 0x00, 0x00, 0x02, 0xbf, 0x54, 0x45, 0x53, 0x54, 0x20, 0x20,
    0x56, 0x49, 0x52, 0x54, 0x49, 0x4f, 0x20, 0x20, 0x01, 0x00, 0x00, 0x00, 0x49, 0x4e, 0x54, 0x4c,
    0x25, 0x09, 0x20, 0x20, 0x10, 0x40, 0x0c, 0x5f, 0x53, 0x42, 0x5f, 0x5b, 0x82, 0x4a, 0x04, 0x50,
    0x43, 0x49, 0x30, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0c, 0x41, 0xd0, 0x0a, 0x08, 0x14, 0x09, 0x5f,
    0x53, 0x54, 0x41, 0x00, 0xa4, 0x0a, 0x0f, 0x5b, 0x82, 0x2e, 0x56, 0x52, 0x49, 0x4e, 0x08, 0x5f,
    0x48, 0x49, 0x44, 0x0d, 0x4c, 0x4e, 0x52, 0x4f, 0x30, 0x30, 0x30, 0x35, 0x00, 0x08, 0x5f, 0x43,
    0x52, 0x53, 0x11, 0x14, 0x0a, 0x11, 0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x02,
    0x00, 0x00, 0x22, 0x00, 0x08, 0x79, 0x00, 0x5b, 0x82, 0x3f, 0x56, 0x52, 0x31, 0x30, 0x08, 0x5f,
    0x43, 0x52, 0x53, 0x11, 0x1e, 0x0a, 0x1b, 0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00,
    0x10, 0x00, 0x00, 0x89, 0x0a, 0x00, 0x09, 0x02, 0x0c, 0x00, 0x00, 0x00, 0x0d, 0x00, 0x00, 0x00,
    0x79, 0x00, 0x08, 0x5f, 0x55, 0x49, 0x44, 0x0a, 0x10, 0x08, 0x5f, 0x48, 0x49, 0x44, 0x0d, 0x4c,
    0x4e, 0x52, 0x4f, 0x30, 0x30, 0x30, 0x35, 0x00, 0x5b, 0x82, 0x2b, 0x4e, 0x4f, 0x54, 0x56, 0x08,
    0x5f, 0x48, 0x49, 0x44, 0x0d, 0x4c, 0x4e, 0x52, 0x4f, 0x30, 0x30, 0x30, 0x36, 0x00, 0x08, 0x5f,
    0x43, 0x52, 0x53, 0x11, 0x11, 0x0a, 0x0e, 0x86, 0x09, 0x00, 0x01, 0x00, 0x20, 0x00, 0xd0, 0x00,
    0x10, 0x00, 0x00, 0x79, 0x00,
];

/// The AML of a whole table (past its 36-byte header).
fn aml(table: &[u8]) -> &[u8] {
    &table[36..]
}

/// Scans `aml` as from a table in memory, window by window.
fn scan(aml: &[u8]) -> Result<Vec<Device>, DsdtError> {
    let mut list = DeviceList::new();
    scan_dsdt(
        aml.len(),
        |at, buf: &mut [u8]| -> Result<(), DsdtError> {
            buf.copy_from_slice(&aml[at..at + buf.len()]);
            Ok(())
        },
        &mut list,
    )?;
    Ok(list.as_slice().to_vec())
}

fn dev(base: u64, size: u64, irqs: &[u32]) -> Device {
    let mut set = Irqs::new();
    for &i in irqs {
        assert!(set.push(i));
    }
    Device {
        base,
        size,
        irqs: set,
    }
}

fn cgvm_devices() -> Vec<Device> {
    std::vec![
        dev(0xc000_1000, 0x1000, &[5]),
        dev(0xc000_2000, 0x1000, &[6]),
        dev(0xc000_3000, 0x1000, &[7]),
    ]
}

// ---------------------------------------------------------------------------------------------
// Command line

#[test]
fn cmdline_entries_as_cgvm_writes_them() {
    assert_eq!(
        parse_cmdline_entry(b"4K@0xc0001000:5"),
        Ok(dev(0xc000_1000, 0x1000, &[5]))
    );
    assert_eq!(
        parse_cmdline_entry(b"0x1000@0xc0002000:6"),
        Ok(dev(0xc000_2000, 0x1000, &[6]))
    );
    let line = b"console=ttyS0 virtio_mmio.device=4K@0xc0001000:5 probe.tests=blk \
                 virtio_mmio.device=4k@0xc0002000:6:3 virtio_mmio.devicex=1";
    let list = cmdline_devices(line).unwrap();
    assert_eq!(
        list.as_slice(),
        &[
            dev(0xc000_1000, 0x1000, &[5]),
            dev(0xc000_2000, 0x1000, &[6])
        ]
    );
}

#[test]
fn cmdline_numbers_as_linux_reads_them() {
    // Sizes: memparse suffixes, any base.
    for (entry, size) in [
        (&b"512@0xd0000000:1"[..], 512),
        (b"1M@0xd0000000:1", 1 << 20),
        (b"1g@0xd0000000:1", 1 << 30),
        (b"0x200@0xd0000000:1", 0x200),
        (b"010@0xd0000000:1", 8),
        (b"0@0xd0000000:1", 0),
    ] {
        match parse_cmdline_entry(entry) {
            Ok(d) => assert_eq!(d.size, size, "{entry:?}"),
            Err(e) => assert!(size == 0 && e == EntryError::ZeroSize, "{entry:?}: {e:?}"),
        }
    }
    // Bases: %lli (hex, octal, decimal); irqs decimal; an optional id, maybe negative.
    assert_eq!(
        parse_cmdline_entry(b"4K@3489660928:9").unwrap().base,
        0xd000_0000
    );
    assert_eq!(
        parse_cmdline_entry(b"4K@0XD0000000:9").unwrap().base,
        0xd000_0000
    );
    assert_eq!(
        parse_cmdline_entry(b"4K@032000000000:9").unwrap().base,
        0xd000_0000
    );
    assert_eq!(
        parse_cmdline_entry(b"4K@0xd0000000:22:-1").unwrap().irqs,
        Irqs::one(22)
    );
}

#[test]
fn bad_cmdline_entries() {
    for (entry, why) in [
        (&b""[..], EntryError::Size),
        (b"K@0xd0000000:5", EntryError::Size),
        (b"4X@0xd0000000:5", EntryError::NoAt),
        (b"4K 0xd0000000:5", EntryError::NoAt),
        (b"4K@:5", EntryError::Base),
        (b"4K@0x:5", EntryError::NoColon),
        (b"4K@0xd0000000", EntryError::NoColon),
        (b"4K@0xd0000000:", EntryError::Irq),
        (b"4K@0xd0000000:x", EntryError::Irq),
        (b"4K@0xd0000000:0", EntryError::ZeroIrq),
        (b"4K@0xd0000000:4294967296", EntryError::Irq),
        (b"4K@0xd0000000:5x", EntryError::Trailing),
        (b"4K@0xd0000000:5:", EntryError::Trailing),
        (b"4K@0xd0000000:5:1:2", EntryError::Trailing),
        (b"0@0xd0000000:5", EntryError::ZeroSize),
        (b"16E@0xd0000000:5", EntryError::Size),
        (b"99999999999999999999@0xd0000000:5", EntryError::Size),
        (b"8K@0xfffffffffffff000:5", EntryError::Wraps),
    ] {
        assert_eq!(
            parse_cmdline_entry(entry),
            Err(why),
            "{:?}",
            std::str::from_utf8(entry)
        );
    }
    // "0x" with no hex digit is the number 0 followed by "x" (as in Linux).
    assert_eq!(c_number(b"0x"), Some((0, &b"x"[..])));
    assert_eq!(c_number(b"0x1g"), Some((1, &b"g"[..])));
    assert_eq!(c_number(b"09"), Some((0, &b"9"[..])));
    assert_eq!(c_number(b"x"), None);
    // A bare key is an (empty, bad) entry too; the first bad one is reported.
    let line = b"virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device virtio_mmio.device=x";
    assert_eq!(cmdline_entries(line).count(), 3);
    assert_eq!(cmdline_devices(line), Err((&b""[..], EntryError::Size)));
}

#[test]
fn cmdline_without_devices() {
    assert_eq!(cmdline_devices(b"probe.tests=blk").unwrap().as_slice(), &[]);
    assert_eq!(cmdline_devices(b"").unwrap().as_slice(), &[]);
}

// ---------------------------------------------------------------------------------------------
// DSDT

#[test]
fn finds_cgvm_devices_in_cgvm_dsdt() {
    assert_eq!(scan(aml(&CGVM_DSDT)), Ok(cgvm_devices()));
    // The names, from parse_device at each DeviceOp.
    let a = aml(&CGVM_DSDT);
    let names: Vec<[u8; 4]> = (0..a.len())
        .filter_map(|i| parse_device(&a[i..]))
        .map(|r| r.unwrap().name)
        .collect();
    assert_eq!(names, [*b"VR00", *b"VR01", *b"VR02"]);
}

#[test]
fn finds_devices_across_window_boundaries() {
    let a = aml(&CGVM_DSDT);
    for pad in [0, 1, WINDOW - 300, WINDOW - 1, WINDOW, 3 * WINDOW + 7] {
        // NoopOp padding before the AML, and after it.
        let mut v = std::vec![0xa3u8; pad];
        v.extend_from_slice(a);
        assert_eq!(scan(&v), Ok(cgvm_devices()), "pad {pad}");
        v.extend_from_slice(&[0xa3; 700]);
        assert_eq!(scan(&v), Ok(cgvm_devices()), "pad {pad}, tail");
    }
}

#[test]
fn iasl_variants() {
    // Nested device with a small IRQ descriptor; _CRS before _HID with two interrupts; a
    // device with another _HID left out; PCI0's EisaId _HID and Method skipped.
    assert_eq!(
        scan(aml(&IASL_AML)),
        Ok(std::vec![
            dev(0xd000_0000, 0x200, &[11]),
            dev(0xd000_1000, 0x1000, &[12, 13]),
        ])
    );
}

#[test]
fn no_devices() {
    assert_eq!(scan(&[]), Ok(std::vec![]));
    assert_eq!(scan(&[0x5b]), Ok(std::vec![]));
    assert_eq!(scan(&[0x5b, 0x82]), Ok(std::vec![]));
    // cgvm's DSDT with the devices renamed to another _HID.
    let mut a = aml(&CGVM_DSDT).to_vec();
    for i in 0..a.len() - 8 {
        if &a[i..i + 8] == LNRO0005 {
            a[i + 7] = b'6';
        }
    }
    assert_eq!(scan(&a), Ok(std::vec![]));
}

/// Offset of the first `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn malformed_virtio_devices() {
    let a = aml(&CGVM_DSDT);
    let vr00 = find(a, b"VR00") - 4; // DeviceOp, 2-byte PkgLength
    assert_eq!(&a[vr00..vr00 + 2], &DEVICE_OP);
    let name = *b"VR00";

    // The AML ends inside VR00: truncated, at VR00's offset.
    let cut = find(a, b"VR01") - 10;
    assert_eq!(
        scan(&a[..cut]),
        Err(DsdtError::Truncated { offset: vr00, name })
    );

    // _CRS renamed: no _CRS.
    let mut v = a.to_vec();
    let crs = vr00 + find(&a[vr00..], b"_CRS");
    v[crs + 1] = b'X';
    assert_eq!(scan(&v), Err(DsdtError::NoCrs { offset: vr00, name }));

    // _CRS not a buffer.
    let mut v = a.to_vec();
    v[crs + 4] = 0x12;
    assert_eq!(
        scan(&v),
        Err(DsdtError::CrsNotBuffer {
            offset: vr00,
            name,
            op: 0x12
        })
    );

    // Memory32Fixed length 8.
    let mut v = a.to_vec();
    let mem = crs + find(&a[crs..], &[0x86, 0x09, 0x00]);
    v[mem + 1] = 8;
    assert_eq!(
        scan(&v),
        Err(DsdtError::Crs {
            offset: vr00,
            name,
            error: CrsError::Memory32Length(8)
        })
    );

    // Extended Interrupt claiming 2 interrupts in 6 bytes.
    let mut v = a.to_vec();
    let irq = crs + find(&a[crs..], &[0x89, 0x06, 0x00]);
    v[irq + 4] = 2;
    assert_eq!(
        scan(&v),
        Err(DsdtError::Crs {
            offset: vr00,
            name,
            error: CrsError::InterruptLength(6)
        })
    );

    // Too many devices.
    let mut big = Vec::new();
    for _ in 0..(MAX_DEVICES / 3 + 1) {
        big.extend_from_slice(a);
    }
    assert_eq!(scan(&big), Err(DsdtError::TooMany));
}

#[test]
fn crs_buffers() {
    let mem = [
        0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00,
    ];
    let ext = [0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00];
    let end = [0x79, 0x00];
    let join = |parts: &[&[u8]]| parts.concat();
    assert_eq!(
        parse_crs(&join(&[&mem, &ext, &end])),
        Ok(dev(0xc000_1000, 0x1000, &[5]))
    );
    assert_eq!(parse_crs(&join(&[&mem, &ext])), Err(CrsError::NoEndTag));
    assert_eq!(parse_crs(&join(&[&mem, &end])), Err(CrsError::NoInterrupt));
    assert_eq!(parse_crs(&join(&[&ext, &end])), Err(CrsError::NoWindow));
    assert_eq!(
        parse_crs(&join(&[&mem, &mem, &ext, &end])),
        Err(CrsError::TwoWindows)
    );
    assert_eq!(parse_crs(&mem[..5]), Err(CrsError::Truncated(0)));
    assert_eq!(parse_crs(&[0x86]), Err(CrsError::Truncated(0)));
    // Small IRQ with 2 or 3 bytes; other small and large descriptors are skipped.
    let small = [0x22, 0x20, 0x00];
    let io = [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08];
    assert_eq!(
        parse_crs(&join(&[&io, &mem, &small, &end])),
        Ok(dev(0xc000_1000, 0x1000, &[5]))
    );
    assert_eq!(
        parse_crs(&join(&[&mem, &[0x21, 0x00], &end])),
        Err(CrsError::IrqLength(1))
    );
    // Five interrupts: more than the probe records.
    let five = [0x22, 0x1f, 0x00];
    assert_eq!(
        parse_crs(&join(&[&mem, &five, &end])),
        Err(CrsError::TooManyInterrupts)
    );
}

#[test]
fn hostile_bytes_never_panic() {
    // Every prefix and every single-byte corruption of both tables.
    for table in [&CGVM_DSDT[..], &IASL_AML[..]] {
        let a = aml(table);
        for cut in 0..a.len() {
            let _ = scan(&a[..cut]);
        }
        for i in 0..a.len() {
            for b in [0x00, 0x01, 0x0a, 0x11, 0x40, 0x5b, 0x82, 0x86, 0x89, 0xff] {
                let mut v = a.to_vec();
                v[i] = b;
                let _ = scan(&v);
            }
        }
        // parse_device at every offset, on every cut.
        for start in 0..a.len() {
            for end in start..a.len().min(start + 80) {
                let _ = parse_device(&a[start..end]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Both

#[test]
fn lists_agree_or_not() {
    let c = cgvm_devices();
    assert_eq!(disagreement(&c, &c), None);
    // Order does not matter.
    let mut r = c.clone();
    r.reverse();
    assert_eq!(disagreement(&c, &r), None);
    // Another irq.
    let mut d = c.clone();
    d[1].irqs = Irqs::one(9);
    assert_eq!(
        disagreement(&c, &d),
        Some(Disagreement::Differ {
            cmdline: c[1],
            dsdt: d[1]
        })
    );
    // Another base.
    let mut d = c.clone();
    d[2].base = 0xc000_4000;
    assert_eq!(disagreement(&c, &d), Some(Disagreement::NotInDsdt(c[2])));
    // One missing either way.
    assert_eq!(
        disagreement(&c, &c[..2]),
        Some(Disagreement::NotInDsdt(c[2]))
    );
    assert_eq!(
        disagreement(&c[..2], &c),
        Some(Disagreement::NotInCmdline(c[2]))
    );
    // Same bases, one repeated.
    let mut d = c.clone();
    d.push(c[0]);
    assert_eq!(
        disagreement(&c, &d),
        Some(Disagreement::Count {
            cmdline: 3,
            dsdt: 4
        })
    );
    // An irq set: the same in another order agrees, a subset does not.
    let a = dev(0xd000_0000, 0x1000, &[12, 13]);
    let b = dev(0xd000_0000, 0x1000, &[13, 12]);
    assert!(a.agrees_with(&b));
    assert!(!a.agrees_with(&dev(0xd000_0000, 0x1000, &[12])));
    // A different size.
    assert!(!a.agrees_with(&dev(0xd000_0000, 0x200, &[12, 13])));
}

#[test]
fn display() {
    use std::string::ToString;
    assert_eq!(
        dev(0xc000_1000, 0x1000, &[5]).to_string(),
        "0xc0001000 (4 KiB) irq 5"
    );
    assert_eq!(
        Listed(&[dev(0xd000_1000, 0x200, &[12, 13])]).to_string(),
        "0xd0001000 (512 bytes) irqs 12,13"
    );
    assert_eq!(Listed(&[]).to_string(), "none");
}
