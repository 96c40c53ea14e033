//! Tests of the ACPI tables: structure checks on the bytes in guest memory, then a round trip
//! through ACPICA's `iasl` (disassemble, check, recompile) as an independent reading.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// 2 MiB of guest memory from address 0.
fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

/// `n` virtio-mmio devices, 4 KiB apart in the MMIO hole, IRQs 5.. (wrapping below 24).
fn devices(n: usize) -> Vec<VirtioMmioDevice> {
    (0..n)
        .map(|i| VirtioMmioDevice {
            base: 0xd000_0000 + 0x1000 * i as u64,
            size: 0x1000,
            irq: 5 + (i as u32 % 19),
        })
        .collect()
}

fn config(num_cpus: u8, n_devices: usize) -> AcpiConfig {
    AcpiConfig {
        num_cpus,
        virtio_mmio_devices: devices(n_devices),
        pci: None,
    }
}

/// A machine with PCI and 8 GiB of RAM (the 64-bit window at 9 GiB), and `n_devices`
/// virtio-mmio devices as the VMM places them: after the boot timer, below the PCI windows,
/// IRQs 5..16 (wrapping), clear of the INTx GSIs.
fn pci_config(num_cpus: u8, n_devices: usize) -> AcpiConfig {
    let virtio_mmio_devices = (0..n_devices)
        .map(|i| VirtioMmioDevice {
            base: 0xc000_1000 + 0x1000 * i as u64,
            size: 0x1000,
            irq: 5 + (i as u32 % 11),
        })
        .collect();
    AcpiConfig {
        num_cpus,
        virtio_mmio_devices,
        pci: Some(PciConfig {
            mmio64_start: layout::pci_mmio64_start(8 << 30),
        }),
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// The system description table at `addr`, as long as its header says.
fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    assert!(
        (layout::RSDP_START..layout::ACPI_END).contains(&addr),
        "table at {addr:#x} outside the ACPI area"
    );
    let len = mem.read_obj::<u32>(GuestAddress(addr + 4)).unwrap() as usize;
    assert!(len >= 36, "table at {addr:#x} has length {len}");
    assert!(addr + len as u64 <= layout::ACPI_END);
    read(mem, addr, len)
}

/// Every table, found the way a guest finds them: RSDP -> XSDT -> FADT/MADT, FADT -> DSDT.
struct Found {
    rsdp: Vec<u8>,
    xsdt_addr: u64,
    xsdt: Vec<u8>,
    /// (address, bytes) of each table the XSDT lists, in order.
    listed: Vec<(u64, Vec<u8>)>,
    dsdt_addr: u64,
    dsdt: Vec<u8>,
}

impl Found {
    fn listed(&self, signature: &[u8; 4]) -> &[u8] {
        let hits: Vec<_> = self
            .listed
            .iter()
            .filter(|(_, t)| &t[0..4] == signature)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "XSDT lists {signature:?} {} times",
            hits.len()
        );
        &hits[0].1
    }
    fn fadt(&self) -> &[u8] {
        self.listed(b"FACP")
    }
    fn madt(&self) -> &[u8] {
        self.listed(b"APIC")
    }
    fn mcfg(&self) -> &[u8] {
        self.listed(b"MCFG")
    }
}

fn find_tables(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Found {
    let rsdp = read(mem, rsdp_addr.0, 36);
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = table_at(mem, xsdt_addr);
    assert_eq!(&xsdt[0..4], b"XSDT");
    assert_eq!((xsdt.len() - 36) % 8, 0);
    let listed: Vec<(u64, Vec<u8>)> = (36..xsdt.len())
        .step_by(8)
        .map(|off| {
            let a = u64_at(&xsdt, off);
            (a, table_at(mem, a))
        })
        .collect();
    let fadt = &listed.iter().find(|(_, t)| &t[0..4] == b"FACP").unwrap().1;
    let dsdt_addr = u64_at(fadt, 140);
    let dsdt = table_at(mem, dsdt_addr);
    Found {
        rsdp,
        xsdt_addr,
        xsdt,
        listed,
        dsdt_addr,
        dsdt,
    }
}

fn create(cfg: &AcpiConfig) -> (GuestMemoryMmap, GuestAddress, Found) {
    let mem = guest_mem();
    let rsdp = create_acpi_tables(&mem, cfg).unwrap();
    let found = find_tables(&mem, rsdp);
    (mem, rsdp, found)
}

/// (type, bytes) of each MADT interrupt controller structure.
fn madt_structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(
            len >= 2 && off + len <= madt.len(),
            "bad MADT structure at {off}"
        );
        v.push((madt[off], madt[off..off + len].to_vec()));
        off += len;
    }
    v
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| w == &needle)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Structure

#[test]
fn rsdp_is_at_0xe0000_with_valid_checksums() {
    let (_mem, rsdp_addr, found) = create(&config(1, 0));
    assert_eq!(rsdp_addr, GuestAddress(layout::RSDP_START));
    assert_eq!(rsdp_addr, GuestAddress(0xe0000));
    let rsdp = &found.rsdp;
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum (first 20 bytes)");
    assert_eq!(sum(&rsdp[0..36]), 0, "RSDP extended checksum (36 bytes)");
    assert_eq!(&rsdp[9..15], b"CGVM  ");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
    assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
    assert!(
        found.xsdt_addr >= layout::RSDP_START + 36,
        "the XSDT follows the RSDP"
    );
}

#[test]
fn xsdt_lists_the_fadt_and_the_madt() {
    let (_mem, _, found) = create(&config(2, 1));
    let signatures: Vec<&[u8]> = found.listed.iter().map(|(_, t)| &t[0..4]).collect();
    assert_eq!(signatures, vec![&b"FACP"[..], &b"APIC"[..]]);
    assert_eq!(&found.xsdt[0..4], b"XSDT");
    assert_eq!(found.xsdt.len(), 36 + 2 * 8);
}

#[test]
fn every_table_sums_to_zero_is_aligned_and_inside_the_area() {
    for cfg in [
        config(1, 0),
        config(2, 3),
        config(32, 19),
        config(255, 256),
        pci_config(1, 0),
        pci_config(255, 256),
    ] {
        let (_mem, _, found) = create(&cfg);
        let mut all: Vec<(u64, &[u8])> = vec![(found.xsdt_addr, &found.xsdt)];
        all.extend(found.listed.iter().map(|(a, t)| (*a, t.as_slice())));
        all.push((found.dsdt_addr, &found.dsdt));
        let mut ranges = vec![(layout::RSDP_START, layout::RSDP_START + 36)];
        for (addr, t) in &all {
            let sig = String::from_utf8_lossy(&t[0..4]);
            assert_eq!(sum(t), 0, "{sig} checksum");
            assert_eq!(u32_at(t, 4) as usize, t.len(), "{sig} length");
            assert_eq!(&t[10..16], b"CGVM  ", "{sig} OEM ID");
            assert_eq!(addr % 16, 0, "{sig} at {addr:#x} is not 16-byte aligned");
            assert!(addr + t.len() as u64 <= layout::ACPI_END);
            ranges.push((*addr, addr + t.len() as u64));
        }
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "tables overlap: {:x?}", w);
        }
    }
}

/// FADT field offsets from the ACPI specification (table 5.9), independent of `acpi_tables`.
mod fadt_off {
    pub const DSDT: usize = 40;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const X_FIRMWARE_CTRL: usize = 132;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
    pub const HYPERVISOR_VENDOR_ID: usize = 268;
    pub const LEN: usize = 276;
}

/// Checks a GAS: 8-bit register at `port` in system I/O space, byte access.
fn assert_io_gas(gas: &[u8], port: u16, what: &str) {
    assert_eq!(gas[0], 1, "{what}: address space SystemIO");
    assert_eq!(gas[1], 8, "{what}: bit width");
    assert_eq!(gas[2], 0, "{what}: bit offset");
    assert_eq!(gas[3], 1, "{what}: access size byte");
    assert_eq!(u64_at(gas, 4), u64::from(port), "{what}: address");
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let (_mem, _, found) = create(&config(2, 0));
    let f = found.fadt();
    assert_eq!(f.len(), fadt_off::LEN);
    assert_eq!(f[8], 6, "FADT major revision");
    let flags = u32_at(f, fadt_off::FLAGS);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // X_DSDT points at the DSDT; the 32-bit field is 0.
    assert_eq!(u32_at(f, fadt_off::DSDT), 0);
    let x_dsdt = u64_at(f, fadt_off::X_DSDT);
    assert_eq!(x_dsdt, found.dsdt_addr);
    assert_eq!(&found.dsdt[0..4], b"DSDT");
    assert_eq!(u64_at(f, fadt_off::X_FIRMWARE_CTRL), 0, "no FACS");

    let reg = |off: usize| &f[off..off + 12];
    assert_io_gas(reg(fadt_off::SLEEP_CONTROL_REG), 0x3c0, "sleep control");
    assert_io_gas(reg(fadt_off::SLEEP_STATUS_REG), 0x3c1, "sleep status");
    assert_io_gas(reg(fadt_off::RESET_REG), 0x3c2, "reset register");
    assert_eq!(f[fadt_off::RESET_VALUE], 0x01);

    let iapc = u16_at(f, fadt_off::IAPC_BOOT_ARCH);
    assert_ne!(iapc & fadt::IAPC_VGA_NOT_PRESENT, 0, "VGA not present");
    assert_ne!(iapc & fadt::IAPC_8042, 0, "8042 keyboard controller");
    assert_eq!(
        &f[fadt_off::HYPERVISOR_VENDOR_ID..fadt_off::HYPERVISOR_VENDOR_ID + 8],
        b"CGVM    "
    );
}

#[test]
fn madt_has_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
    for n in [1u8, 2, 32, 255] {
        let (_mem, _, found) = create(&config(n, 0));
        let m = found.madt();
        assert_eq!(m[8], 5, "MADT revision");
        assert_eq!(u32_at(m, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(m, 40), madt::PCAT_COMPAT, "MADT flags");
        let s = madt_structures(m);

        let lapics: Vec<_> = s
            .iter()
            .filter(|(t, _)| *t == madt::TYPE_LOCAL_APIC)
            .collect();
        assert_eq!(lapics.len(), n as usize, "local APICs for {n} vCPUs");
        let mut ids = HashSet::new();
        let mut uids = HashSet::new();
        for (i, (_, l)) in lapics.iter().enumerate() {
            assert_eq!(l.len(), 8);
            assert_eq!(l[2] as usize, i, "processor UID = index");
            assert_eq!(l[3] as usize, i, "APIC ID = index");
            assert_ne!(l[3], 0xff, "0xff is the broadcast APIC ID");
            assert_eq!(u32_at(l, 4) & 1, 1, "enabled");
            ids.insert(l[3]);
            uids.insert(l[2]);
        }
        assert_eq!(ids.len(), n as usize, "APIC IDs unique");
        assert_eq!(uids.len(), n as usize, "processor UIDs unique");

        let ioapics: Vec<_> = s.iter().filter(|(t, _)| *t == madt::TYPE_IO_APIC).collect();
        assert_eq!(ioapics.len(), 1);
        let io = &ioapics[0].1;
        assert_eq!(io.len(), 12);
        assert_eq!(io[2], madt::IOAPIC_ID);
        assert_eq!(u32_at(io, 4), 0xfec0_0000, "IOAPIC address");
        assert_eq!(u32_at(io, 8), 0, "GSI base");

        let nmis: Vec<_> = s
            .iter()
            .filter(|(t, _)| *t == madt::TYPE_LOCAL_APIC_NMI)
            .collect();
        assert_eq!(nmis.len(), 1);
        let nmi = &nmis[0].1;
        assert_eq!(nmi.len(), 6);
        assert_eq!(nmi[2], madt::ALL_PROCESSORS);
        assert_eq!(nmi[5], 1, "LINT1");

        // ISA IRQs are identity-mapped (KVM's default GSI routing): no overrides.
        assert!(!s
            .iter()
            .any(|(t, _)| *t == madt::TYPE_INTERRUPT_SOURCE_OVERRIDE));
        assert_eq!(s.len(), n as usize + 2, "nothing else in the MADT");
    }
}

#[test]
fn dsdt_names_the_platform_devices_and_one_lnro0005_per_virtio_mmio_device() {
    for n in [0usize, 1, 3, 256] {
        let (_mem, _, found) = create(&config(1, n));
        let d = &found.dsdt;
        assert_eq!(d[8], 2, "DSDT revision");
        assert_eq!(count(d, b"LNRO0005"), n);
        assert_eq!(count(d, b"QEMU0001"), 1);
        assert_eq!(count(d, b"_S5_"), 1);
        for name in ["COM1", "RTC_", "KBD_", "PEVT", "MRES"] {
            assert_eq!(count(d, name.as_bytes()), 1, "{name}");
        }
        if n > 0 {
            assert_eq!(count(d, b"VR00"), 1);
            assert_eq!(count(d, format!("VR{:02X}", n - 1).as_bytes()), 1);
        }
    }
}

#[test]
fn dsdt_s5_package_gives_slp_typ_5() {
    let (_mem, _, found) = create(&config(1, 0));
    // NameOp '\' "_S5_" PackageOp PkgLength NumElements BytePrefix 5 Zero Zero Zero
    let at = found.dsdt.windows(5).position(|w| w == b"\\_S5_").unwrap();
    let tail = &found.dsdt[at - 1..];
    assert_eq!(tail[0], 0x08, "NameOp");
    assert_eq!(tail[6], 0x12, "PackageOp");
    assert_eq!(tail[8], 4, "four elements");
    assert_eq!(&tail[9..11], &[0x0a, 5], "SLP_TYPa = 5");
    assert_eq!(&tail[11..14], &[0, 0, 0]);
    // What Linux then writes to the sleep control register: SLP_EN | SLP_TYP << 2.
    assert_eq!(((dsdt::S5_SLP_TYP << 2) & 0x1c) | 0x20, 0x34);
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn zero_vcpus_is_an_error() {
    let mem = guest_mem();
    let err = create_acpi_tables(&mem, &config(0, 0)).unwrap_err();
    assert!(matches!(err, AcpiError::InvalidCpuCount(0)), "{err}");
    // 255 (the most a u8 holds) is the largest valid count: APIC IDs 0..=254.
    assert!(create_acpi_tables(&mem, &config(MAX_CPUS, 0)).is_ok());
}

#[test]
fn too_many_virtio_mmio_devices_is_an_error_and_writes_nothing() {
    let mem = guest_mem();
    let cfg = config(1, MAX_VIRTIO_MMIO_DEVICES + 1);
    let err = create_acpi_tables(&mem, &cfg).unwrap_err();
    assert!(
        matches!(err, AcpiError::TooManyVirtioMmioDevices(257)),
        "{err}"
    );
    let cfg = config(1, 10_000);
    assert!(create_acpi_tables(&mem, &cfg).is_err());
    assert!(read(&mem, layout::RSDP_START, 0x1000)
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn invalid_virtio_mmio_devices_are_errors() {
    let ok = VirtioMmioDevice {
        base: 0xd000_0000,
        size: 0x1000,
        irq: 5,
    };
    let bad = [
        VirtioMmioDevice { size: 0, ..ok },
        VirtioMmioDevice {
            base: 0x1_0000_0000,
            ..ok
        },
        VirtioMmioDevice {
            base: 0xffff_f800,
            ..ok
        },
        VirtioMmioDevice {
            base: u64::MAX,
            ..ok
        },
        VirtioMmioDevice { irq: 24, ..ok },
    ];
    let mem = guest_mem();
    for d in bad {
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_mmio_devices: vec![ok, d],
            pci: None,
        };
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(
            matches!(err, AcpiError::InvalidVirtioMmioDevice { index: 1, .. }),
            "{d:?}: {err}"
        );
    }
    // The last window that fits: ends exactly at 4 GiB.
    let edge = VirtioMmioDevice {
        base: 0xffff_f000,
        ..ok
    };
    let cfg = AcpiConfig {
        num_cpus: 1,
        virtio_mmio_devices: vec![edge],
        pci: None,
    };
    assert!(create_acpi_tables(&mem, &cfg).is_ok());
}

#[test]
fn tables_that_do_not_fit_are_an_error_not_a_panic() {
    // The largest configuration fits the real area...
    let big = pci_config(MAX_CPUS, MAX_VIRTIO_MMIO_DEVICES);
    let t = build_tables(&big, layout::RSDP_START, layout::ACPI_END).unwrap();
    let end = t
        .tables
        .iter()
        .map(|t| t.addr.0 + t.bytes.len() as u64)
        .max()
        .unwrap();
    assert!(end <= layout::ACPI_END);
    // ...and a smaller area reports the table that overflowed.
    for limit in [end - 1, layout::RSDP_START + 0x100, layout::RSDP_START + 10] {
        let err = build_tables(&big, layout::RSDP_START, limit).unwrap_err();
        match err {
            AcpiError::TablesTooLarge {
                end: e, limit: l, ..
            } => {
                assert_eq!(l, limit);
                assert!(e > limit);
            }
            other => panic!("expected TablesTooLarge, got {other}"),
        }
    }
    // Even at the very top of the address space.
    assert!(build_tables(&config(1, 0), u64::MAX - 8, u64::MAX).is_err());
}

#[test]
fn guest_memory_without_the_acpi_area_is_an_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    let err = create_acpi_tables(&mem, &config(1, 0)).unwrap_err();
    assert!(matches!(err, AcpiError::GuestMemory { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// iasl round trip

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("cgvm-acpi-test-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `iasl args` in `dir`: (success, stdout + stderr). Fails the test if iasl is missing.
fn iasl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`iasl` is not installed: the ACPI round-trip tests need it. Install Debian's \
             acpica-tools package (`apt-get install acpica-tools`); CI installs it."
        ),
        Err(e) => panic!("cannot run iasl: {e}"),
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), log)
}

/// Writes `bytes` to `<stem>.dat`, disassembles it with `iasl -d` and returns the .dsl text.
/// Returns Err(log) if iasl failed or complained.
fn try_disassemble(dir: &Path, stem: &str, bytes: &[u8]) -> Result<String, String> {
    let file = format!("{stem}.dat");
    std::fs::write(dir.join(&file), bytes).unwrap();
    let (ok, log) = iasl(dir, &["-d", &file]);
    if !ok || log.contains("Error") || log.contains("Warning") {
        return Err(log);
    }
    let dsl = std::fs::read_to_string(dir.join(format!("{stem}.dsl")))
        .map_err(|e| format!("no {stem}.dsl ({e}): {log}"))?;
    if dsl.contains("Incorrect checksum") || dsl.contains("Invalid") {
        return Err(dsl);
    }
    Ok(dsl)
}

fn disassemble(dir: &Path, stem: &str, bytes: &[u8]) -> String {
    try_disassemble(dir, stem, bytes)
        .unwrap_or_else(|log| panic!("iasl -d {stem}.dat failed or complained:\n{log}"))
}

/// Compiles `<stem>.dsl` back with iasl, asserting no errors, warnings or remarks, and returns
/// the compiled table.
fn recompile(dir: &Path, stem: &str) -> Vec<u8> {
    let (ok, log) = iasl(dir, &[&format!("{stem}.dsl")]);
    assert!(
        ok && log.contains("0 Errors, 0 Warnings, 0 Remarks"),
        "recompiling {stem}.dsl:\n{log}"
    );
    std::fs::read(dir.join(format!("{stem}.aml"))).unwrap()
}

/// The table iasl compiled from our disassembly equals ours, but for the checksum and the
/// creator ID/revision (iasl puts its own).
fn assert_same_but_creator(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: length after the iasl round trip"
    );
    assert_eq!(sum(theirs), 0, "{what}: iasl's checksum");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if i != 9 && !(28..36).contains(&i) {
            assert_eq!(a, b, "{what}: byte {i} differs after the iasl round trip");
        }
    }
}

fn count_str(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn iasl_round_trip() {
    let dir = Scratch::new("round-trip");
    let d = &dir.0;
    let cfg = AcpiConfig {
        num_cpus: 2,
        virtio_mmio_devices: vec![
            VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            VirtioMmioDevice {
                base: 0xd000_1000,
                size: 0x200,
                irq: 6,
            },
        ],
        pci: None,
    };
    let (_mem, _, found) = create(&cfg);

    // DSDT
    let dsl = disassemble(d, "dsdt", &found.dsdt);
    for s in [
        "DefinitionBlock (\"\", \"DSDT\", 2, \"CGVM  \", \"CGVMDSDT\"",
        "Scope (\\_SB)",
        "Device (COM1)",
        "EisaId (\"PNP0501\")",
        "0x03F8,",
        "Device (RTC)",
        "EisaId (\"PNP0B00\")",
        "Device (KBD)",
        "EisaId (\"PNP0303\")",
        "0x0060,",
        "0x0064,",
        "Device (PEVT)",
        "Name (_HID, \"QEMU0001\")",
        "Name (_STA, 0x0F)",
        "0x0505,",
        "EisaId (\"PNP0C02\")",
        "0x00F4,",
        "0x03C0,",
        "Device (VR00)",
        "Device (VR01)",
        "Name (_CCA, One)",
        "0xD0000000,",
        "0xD0001000,",
        "0x00000200,",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        "Name (\\_S5, Package (0x04)",
    ] {
        assert!(dsl.contains(s), "DSDT disassembly lacks {s:?}:\n{dsl}");
    }
    assert_eq!(count_str(&dsl, "Name (_HID, \"LNRO0005\")"), 2, "{dsl}");
    let rtc = &dsl[dsl.find("Device (RTC)").unwrap()..dsl.find("Device (KBD)").unwrap()];
    assert!(
        !rtc.contains("Interrupt"),
        "the RTC has no interrupt: {rtc}"
    );
    assert!(!dsl.contains("PNP0F13"), "no PS/2 mouse");
    let aml = recompile(d, "dsdt");
    assert_eq!(&aml[0..4], b"DSDT");

    // FADT
    let dsl = disassemble(d, "facp", found.fadt());
    for s in [
        "Signature : \"FACP\"",
        "Revision : 06",
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Address : 00000000000003C0",
        "Address : 00000000000003C1",
        "Address : 00000000000003C2",
        "Value to cause reset : 01",
        "VGA Not Present (V4) : 1",
        "8042 Present on ports 60/64 (V2) : 1",
        &format!("DSDT Address : {:016X}", found.dsdt_addr),
    ] {
        assert!(dsl.contains(s), "FADT disassembly lacks {s:?}:\n{dsl}");
    }
    assert_eq!(count_str(&dsl, "Space ID : 01 [SystemIO]"), 3, "{dsl}");
    let aml = recompile(d, "facp");
    assert_same_but_creator(found.fadt(), &aml, "FADT");

    // MADT
    let dsl = disassemble(d, "apic", found.madt());
    for s in [
        "Local Apic Address : FEE00000",
        "PC-AT Compatibility : 1",
        "[I/O APIC]",
        "Address : FEC00000",
        "[Local APIC NMI]",
        "Processor ID : FF",
        "Interrupt Input LINT : 01",
    ] {
        assert!(dsl.contains(s), "MADT disassembly lacks {s:?}:\n{dsl}");
    }
    assert_eq!(count_str(&dsl, "[Processor Local APIC]"), 2, "{dsl}");
    assert_eq!(count_str(&dsl, "Processor Enabled : 1"), 2, "{dsl}");
    let aml = recompile(d, "apic");
    assert_same_but_creator(found.madt(), &aml, "MADT");

    // XSDT
    let dsl = disassemble(d, "xsdt", &found.xsdt);
    for (i, (addr, _)) in found.listed.iter().enumerate() {
        let s = format!("ACPI Table Address   {i} : {addr:016X}");
        assert!(dsl.contains(&s), "XSDT disassembly lacks {s:?}:\n{dsl}");
    }
    let aml = recompile(d, "xsdt");
    assert_same_but_creator(&found.xsdt, &aml, "XSDT");

    // The RSDP is not an SDT: this iasl does not take a binary RSDP ("does not contain a valid
    // ACPI table"); rsdp_is_at_0xe0000_with_valid_checksums checks it.
}

#[test]
fn iasl_madt_for_32_vcpus() {
    let dir = Scratch::new("madt-32");
    let (_mem, _, found) = create(&config(32, 0));
    let dsl = disassemble(&dir.0, "apic", found.madt());
    assert_eq!(count_str(&dsl, "[Processor Local APIC]"), 32);
    assert!(dsl.contains("Local Apic ID : 1F"));
    let aml = recompile(&dir.0, "apic");
    assert_same_but_creator(found.madt(), &aml, "MADT");
}

/// The iasl checks above would notice a bad checksum: corrupt one and see them complain.
#[test]
fn iasl_check_notices_a_bad_checksum() {
    let dir = Scratch::new("bad-checksum");
    let (_mem, _, found) = create(&pci_config(1, 1));
    for (stem, table) in [
        ("apic", found.madt()),
        ("mcfg", found.mcfg()),
        ("dsdt", found.dsdt.as_slice()),
    ] {
        let mut bad = table.to_vec();
        bad[9] = bad[9].wrapping_add(1);
        let err = try_disassemble(&dir.0, stem, &bad).unwrap_err();
        assert!(err.contains("checksum"), "{stem}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// PCI

/// FNV-1a, 64-bit: a fingerprint of the bytes of the whole ACPI area.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Without PCI, the ACPI area holds exactly what it held before PCI was added: these are the
/// fingerprints of the whole area (RSDP_START..ACPI_END) that the tables of the MMIO-only
/// machine had then. A deliberate change to those tables updates them.
#[test]
fn without_pci_the_tables_are_byte_identical_to_the_mmio_only_machine() {
    for (cpus, devices, fingerprint) in [
        (1u8, 0usize, 0x5115_232b_9ed2_a95d),
        (2, 3, 0x4c04_f6e9_18c6_9623),
        (4, 1, 0xb1da_7f4d_9b97_fdb9),
        (255, 256, 0x19af_955e_937f_5e31),
    ] {
        let (mem, _, found) = create(&config(cpus, devices));
        let area = read(
            &mem,
            layout::RSDP_START,
            (layout::ACPI_END - layout::RSDP_START) as usize,
        );
        assert_eq!(
            fnv1a(&area),
            fingerprint,
            "the tables for {cpus} vCPUs and {devices} virtio-mmio devices changed"
        );
        assert!(!found.listed.iter().any(|(_, t)| &t[0..4] == b"MCFG"));
        assert_eq!(count(&found.dsdt, b"PCI0"), 0);
        assert_eq!(count(&found.dsdt, b"_PRT"), 0);
    }
}

#[test]
fn with_pci_the_xsdt_lists_the_mcfg_after_the_fadt_and_the_madt() {
    let (_mem, _, found) = create(&pci_config(2, 1));
    let signatures: Vec<&[u8]> = found.listed.iter().map(|(_, t)| &t[0..4]).collect();
    assert_eq!(signatures, vec![&b"FACP"[..], &b"APIC"[..], &b"MCFG"[..]]);
    assert_eq!(found.xsdt.len(), 36 + 3 * 8);
    // PCI adds the MCFG and a DSDT device; the FADT (the DSDT stays first, at the same
    // address) and the MADT stay as they were.
    let (_mem, _, without) = create(&config(2, 1));
    assert_eq!(found.dsdt_addr, without.dsdt_addr);
    assert_eq!(found.fadt(), without.fadt());
    assert_eq!(found.madt(), without.madt());
}

/// MCFG layout from the PCI Firmware Specification 3.3, table 4-3, independent of
/// `acpi_tables`.
#[test]
fn mcfg_has_one_allocation_for_the_ecam_of_segment_0_bus_0() {
    let (_mem, _, found) = create(&pci_config(1, 0));
    let m = found.mcfg();
    assert_eq!(
        m.len(),
        60,
        "header, 8 reserved bytes, one 16-byte allocation"
    );
    assert_eq!(u32_at(m, 4), 60, "MCFG length");
    assert_eq!(sum(m), 0, "MCFG checksum");
    assert_eq!(m[8], 1, "MCFG revision");
    assert_eq!(&m[10..16], b"CGVM  ");
    assert_eq!(&m[16..24], b"CGVMMCFG");
    assert_eq!(u64_at(m, 36), 0, "reserved");
    assert_eq!(u64_at(m, 44), 0xe000_0000, "ECAM base");
    assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
    assert_eq!(u16_at(m, 52), 0, "segment group");
    assert_eq!(m[54], 0, "start bus");
    assert_eq!(m[55], layout::PCI_LAST_BUS, "end bus");
    assert_eq!(u32_at(m, 56), 0, "reserved");
    // The allocation covers exactly the ECAM region: 1 MiB per bus.
    let buses = u64::from(m[55] - m[54]) + 1;
    assert_eq!(buses << 20, layout::PCI_ECAM_SIZE);
}

#[test]
fn pci_intx_gsi_swizzles_slots_and_pins_over_gsis_16_to_23() {
    assert_eq!(pci_intx_gsi(0, 0), 16);
    assert_eq!(pci_intx_gsi(1, 0), 17);
    assert_eq!(pci_intx_gsi(1, 3), 20);
    assert_eq!(pci_intx_gsi(7, 0), 23);
    assert_eq!(pci_intx_gsi(7, 1), 16);
    assert_eq!(pci_intx_gsi(8, 0), 16);
    assert_eq!(pci_intx_gsi(31, 3), 18);
    for slot in 0..PCI_SLOTS {
        let pins: HashSet<u32> = (0..4).map(|pin| pci_intx_gsi(slot, pin)).collect();
        assert_eq!(pins.len(), 4, "slot {slot}: its four pins share no GSI");
        assert!(pins.iter().all(|g| (16..24).contains(g)), "slot {slot}");
    }
}

#[test]
fn with_pci_virtio_mmio_devices_cannot_take_an_intx_gsi() {
    let mem = guest_mem();
    let mut cfg = pci_config(1, 0);
    for irq in 16..24 {
        cfg.virtio_mmio_devices = vec![VirtioMmioDevice {
            base: 0xc000_1000,
            size: 0x1000,
            irq,
        }];
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(
            matches!(err, AcpiError::InvalidVirtioMmioDevice { index: 0, .. }),
            "IRQ {irq}: {err}"
        );
        // Without PCI the GSI is free for it.
        let cfg = AcpiConfig {
            pci: None,
            ..cfg.clone()
        };
        assert!(create_acpi_tables(&mem, &cfg).is_ok(), "IRQ {irq}");
    }
    cfg.virtio_mmio_devices[0].irq = 15;
    assert!(create_acpi_tables(&mem, &cfg).is_ok());
}

#[test]
fn pci_io_window_clears_every_legacy_port() {
    let legacy = [
        (layout::I8042_PORT, 5),
        (layout::CMOS_PORT, 2),
        (layout::EXIT_PORT, 1),
        (layout::ACPI_SLEEP_CONTROL_PORT, 3),
        (layout::COM1_PORT, 8),
        (layout::PVPANIC_PORT, 1),
        (layout::PCI_CONFIG_PORT, layout::PCI_CONFIG_PORT_SIZE as u16),
        // KVM's in-kernel PIC (0x20, 0xa0, ELCR 0x4d0) and PIT (0x40..0x44, speaker 0x61).
        (0x20, 2),
        (0xa0, 2),
        (0x4d0, 2),
        (0x40, 4),
        (0x61, 1),
    ];
    for (port, len) in legacy {
        assert!(port + len <= PCI_IO_WINDOW_START, "{port:#x}+{len}");
    }
    assert_eq!(PCI_IO_WINDOW_END, 0xffff);
}

#[test]
fn invalid_pci_mmio64_windows_are_errors_and_write_nothing() {
    let mem = guest_mem();
    let size = layout::PCI_MMIO64_SIZE;
    for start in [0, 0xd000_0000, 0xffff_ffff, u64::MAX - size + 2, u64::MAX] {
        let cfg = AcpiConfig {
            pci: Some(PciConfig {
                mmio64_start: start,
            }),
            ..config(1, 0)
        };
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(
            matches!(err, AcpiError::InvalidPciMmio64Window(s) if s == start),
            "{start:#x}: {err}"
        );
    }
    assert!(read(&mem, layout::RSDP_START, 0x1000)
        .iter()
        .all(|b| *b == 0));
    // The edges: right at 4 GiB, and ending at the top of the address space.
    for start in [4 << 30, u64::MAX - size + 1] {
        let cfg = AcpiConfig {
            pci: Some(PciConfig {
                mmio64_start: start,
            }),
            ..config(1, 0)
        };
        assert!(create_acpi_tables(&mem, &cfg).is_ok(), "{start:#x}");
    }
}

/// The part of a disassembled DSDT from `Device (name)` to the next device or `\_S5`.
fn device_dsl<'a>(dsl: &'a str, name: &str) -> &'a str {
    let start = dsl
        .find(&format!("Device ({name})"))
        .unwrap_or_else(|| panic!("no Device ({name}) in:\n{dsl}"));
    let rest = &dsl[start + 1..];
    let end = [rest.find("Device ("), rest.find("Name (\\_S5")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    &dsl[start..start + 1 + end]
}

/// An integer as iasl writes it: `Zero`, `One`, `Ones` or hex.
fn dsl_int(token: &str) -> Option<u64> {
    match token {
        "Zero" => Some(0),
        "One" => Some(1),
        "Ones" => Some(u64::MAX),
        _ => u64::from_str_radix(token.strip_prefix("0x")?, 16).ok(),
    }
}

/// The resource descriptors of the `_CRS` in a disassembled device: (the descriptor's first
/// line, e.g. `WordIO (ResourceProducer, …`, and its numeric fields in order).
fn crs_descriptors(device: &str) -> Vec<(String, Vec<u64>)> {
    let crs = &device[device.find("Name (_CRS").expect("no _CRS")..];
    let crs = &crs[..crs.find("})").expect("unterminated _CRS")];
    let mut v: Vec<(String, Vec<u64>)> = Vec::new();
    for line in crs.lines().skip(2) {
        let line = line.trim();
        let value = line.split(',').next().and_then(dsl_int);
        match value {
            Some(n) if line.contains("//") => v.last_mut().expect("field first").1.push(n),
            _ if line.contains(" (") => v.push((line.to_string(), Vec::new())),
            _ => {}
        }
    }
    v
}

/// The `_PRT` of a disassembled device: each entry's four elements.
fn prt_entries(device: &str) -> Vec<[u64; 4]> {
    let prt = &device[device.find("Name (_PRT").expect("no _PRT")..];
    let body = &prt[prt.find('{').unwrap() + 1..];
    let mut entries = Vec::new();
    let mut rest = body;
    while let Some(open) = rest.find("Package (0x04)") {
        let inner = &rest[open..];
        let inner = &inner[inner.find('{').unwrap() + 1..inner.find('}').unwrap()];
        let values: Vec<u64> = inner
            .split(',')
            .map(|t| dsl_int(t.trim()).unwrap_or_else(|| panic!("{t:?} in _PRT")))
            .collect();
        entries.push(values.try_into().expect("four elements"));
        rest = &rest[open + 1..];
    }
    let declared = prt.lines().next().unwrap();
    assert!(
        declared.contains(&format!("Package (0x{:02X})", entries.len())),
        "{declared}: {} entries",
        entries.len()
    );
    entries
}

#[test]
fn iasl_round_trip_with_pci() {
    let dir = Scratch::new("pci");
    let d = &dir.0;
    let cfg = pci_config(2, 1);
    let mmio64 = cfg.pci.unwrap().mmio64_start;
    assert_eq!(mmio64, 9 << 30);
    let (_mem, _, found) = create(&cfg);

    // DSDT: the host bridge.
    let dsl = disassemble(d, "dsdt", &found.dsdt);
    let pci0 = device_dsl(&dsl, "PCI0");
    for s in [
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Name (_UID, Zero)",
    ] {
        assert!(pci0.contains(s), "PCI0 lacks {s:?}:\n{pci0}");
    }
    assert!(!pci0.contains("_ADR"), "a _HID device has no _ADR");
    assert!(!pci0.contains("_OSC"));
    assert!(dsl.contains("Scope (_SB)") || dsl.contains("Scope (\\_SB)"));

    let producer = "(ResourceProducer, MinFixed, MaxFixed, PosDecode";
    let memory = "(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite";
    let crs = crs_descriptors(pci0);
    let want: [(String, Vec<u64>); 5] = [
        // Granularity, minimum, maximum, translation, length.
        (format!("WordBusNumber {producer},"), vec![0, 0, 0, 0, 1]),
        // Minimum, maximum, alignment, length.
        ("IO (Decode16,".into(), vec![0xcf8, 0xcf8, 1, 8]),
        (
            format!("WordIO {producer}, EntireRange,"),
            vec![0, 0x1000, 0xffff, 0, 0xf000],
        ),
        (
            format!("DWordMemory {memory},"),
            vec![0, 0xd000_0000, 0xdfff_ffff, 0, 0x1000_0000],
        ),
        (
            format!("QWordMemory {memory},"),
            vec![0, 9 << 30, (9 << 30) + (64 << 30) - 1, 0, 64 << 30],
        ),
    ];
    assert_eq!(crs, want, "PCI0 _CRS:\n{pci0}");
    // The windows are those of the layout.
    assert_eq!(crs[3].1[1], layout::PCI_MMIO32_START);
    assert_eq!(crs[3].1[4], layout::PCI_MMIO32_SIZE);
    assert_eq!(crs[4].1[4], layout::PCI_MMIO64_SIZE);
    assert_eq!(crs[1].1[0], u64::from(layout::PCI_CONFIG_PORT));

    // _PRT: every pin of slots 1..=31, swizzled over GSIs 16..=23.
    let prt = prt_entries(pci0);
    assert_eq!(prt.len(), 31 * 4);
    let mut seen = HashSet::new();
    for [address, pin, source, gsi] in &prt {
        let slot = address >> 16;
        assert_eq!(address & 0xffff, 0xffff, "any function: {address:#x}");
        assert!((1..32).contains(&slot), "{address:#x}");
        assert!(*pin < 4);
        assert_eq!(*source, 0, "a GSI, not a link device");
        assert_eq!(*gsi, 16 + (slot + pin) % 8, "slot {slot} pin {pin}");
        assert!(seen.insert((slot, *pin)), "slot {slot} pin {pin} twice");
    }
    assert_eq!(prt[0], [0x0001_ffff, 0, 0, 17]);
    assert_eq!(prt[prt.len() - 1], [0x001f_ffff, 3, 0, 18]);

    // The motherboard resources reserve the ECAM region.
    let mres = crs_descriptors(device_dsl(&dsl, "MRES"));
    assert!(
        mres.contains(&(
            "Memory32Fixed (ReadWrite,".into(),
            vec![0xe000_0000, 0x10_0000]
        )),
        "{mres:?}"
    );
    assert!(device_dsl(&dsl, "MRES").contains("EisaId (\"PNP0C02\")"));
    let aml = recompile(d, "dsdt");
    assert_eq!(&aml[0..4], b"DSDT");

    // MCFG
    let dsl = disassemble(d, "mcfg", found.mcfg());
    for s in [
        "Signature : \"MCFG\"",
        "Table Length : 0000003C",
        "Base Address : 00000000E0000000",
        "Segment Group Number : 0000",
        "Start Bus Number : 00",
        "End Bus Number : 00",
    ] {
        assert!(dsl.contains(s), "MCFG disassembly lacks {s:?}:\n{dsl}");
    }
    let aml = recompile(d, "mcfg");
    assert_same_but_creator(found.mcfg(), &aml, "MCFG");

    // XSDT
    let dsl = disassemble(d, "xsdt", &found.xsdt);
    assert_eq!(count_str(&dsl, "ACPI Table Address"), 3, "{dsl}");
    let aml = recompile(d, "xsdt");
    assert_same_but_creator(&found.xsdt, &aml, "XSDT");
}

/// Without PCI the disassembled DSDT has no host bridge and the motherboard resources do not
/// reserve the ECAM region.
#[test]
fn iasl_dsdt_without_pci_has_no_host_bridge() {
    let dir = Scratch::new("no-pci");
    let (_mem, _, found) = create(&config(1, 1));
    let dsl = disassemble(&dir.0, "dsdt", &found.dsdt);
    for s in ["PCI0", "PNP0A08", "PNP0A03", "_PRT", "_SEG", "_BBN"] {
        assert!(!dsl.contains(s), "{s} without PCI:\n{dsl}");
    }
    let mres = crs_descriptors(device_dsl(&dsl, "MRES"));
    assert_eq!(mres.len(), 3, "{mres:?}");
    assert!(!mres.iter().any(|(_, v)| v.contains(&0xe000_0000)));
}
