//! A stock Debian kernel and the busybox initramfs of resources/linux-guest through the real
//! `cgvm` binary.
//!
//! The guest gets the build's ext4 image as a read-only virtio disk and a virtio entropy device.
//! Where /dev/kvm is hardware virtualization the guest boots to /init, loads virtio_mmio (a
//! module in Debian's kernel, which finds the devices through our DSDT), checks the disk's file
//! and the entropy device, and powers off: status 0. On a PVM host (guest ring 0 emulated, see
//! docs/DESIGN.md) the kernel gets through early boot and then stops on an instruction KVM
//! cannot emulate, long before it loads modules: the test asserts the early-boot lines that
//! prove our boot parameters (the devices' command-line entries among them) and ACPI tables
//! were read, and cgvm's one-line report of the stop. The test states on stderr which of the
//! two it ran.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Builds (or reuses) the Linux guest under the target directory.
fn linux_guest() -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-guest");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("bash")
        .arg(root.join("resources/linux-guest/build.sh"))
        .arg(&out)
        .status()
        .expect("run resources/linux-guest/build.sh");
    assert!(
        status.success(),
        "resources/linux-guest/build.sh failed: {status}"
    );
    out
}

/// Says which variant ran, past the test harness's output capture.
fn announce(what: &str) {
    let _ = writeln!(std::io::stderr().lock(), "linux_boot: {what}");
}

#[test]
fn debian_kernel_boots_as_far_as_this_host_allows() {
    let guest = linux_guest();
    let d = scratch("linux-boot");
    let serial = d.join("serial.log");
    let cmdline =
        "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 cgvm.cpus=2 cgvm.disk=1 cgvm.rng=1";
    let disk = guest.join("disk.ext4");
    let disk_spec = format!("{},ro", disk.display());
    assert!(
        !disk.display().to_string().contains(','),
        "--disk cannot name {}",
        disk.display()
    );
    let mut c = cgvm();
    c.arg("run")
        .arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args([
            "--cmdline",
            cmdline,
            "--cpus",
            "2",
            "--memory",
            "256",
            "--timeout",
            "600",
        ])
        .args(["--disk", &disk_spec, "--rng"])
        .arg("--console")
        .arg(format!("file:{}", serial.display()));
    let r = run_with_limit(c, Duration::from_secs(900));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let ctx = || format!("{}\n--- serial\n{log}", r.both());

    // Early boot, on every host: the kernel read what cgvm gave it.
    assert!(log.contains("Linux version 6."), "kernel banner: {}", ctx());
    let echoed = log
        .lines()
        .find(|l| l.contains("Command line: "))
        .unwrap_or_else(|| panic!("no command-line echo: {}", ctx()));
    assert!(
        echoed.contains(&format!("Command line: {cmdline}")),
        "our command line: {}",
        ctx()
    );
    // cgvm appends one entry per virtio-mmio device: the disk first, then the entropy device.
    for entry in [
        "virtio_mmio.device=4K@0xc0001000:",
        "virtio_mmio.device=4K@0xc0002000:",
    ] {
        assert!(
            echoed.contains(entry),
            "the devices' command-line entries ({entry}): {}",
            ctx()
        );
    }
    for e820 in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    ] {
        assert!(log.contains(e820), "our e820 map ({e820}): {}", ctx());
    }
    for table in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT",
        "ACPI: FACP",
        "ACPI: DSDT",
        "ACPI: APIC",
    ] {
        assert!(log.contains(table), "our ACPI tables ({table}): {}", ctx());
    }
    assert!(
        log.contains("smpboot: Allowing 2 CPUs"),
        "CPU count from our MADT: {}",
        ctx()
    );

    if pvm_host() {
        announce("PVM host (no hardware virtualization): asserted early boot and the emulation-failure report");
        assert_eq!(r.status, Some(121), "{}", ctx());
        let report = r
            .stderr
            .lines()
            .find(|l| l.starts_with("cgvm: vCPU"))
            .unwrap_or_else(|| panic!("no vCPU stop report: {}", ctx()));
        assert!(report.contains("KVM internal error"), "{report}");
        assert!(report.contains("emulation failure"), "{report}");
        assert!(report.contains("at RIP 0xffffffff"), "kernel RIP: {report}");
        let bytes = report
            .split("instruction bytes: ")
            .nth(1)
            .unwrap_or_default();
        assert!(
            bytes
                .split(' ')
                .filter(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok())
                .count()
                >= 2,
            "instruction bytes read through the guest page tables: {report}"
        );
    } else {
        announce(
            "hardware virtualization: asserted a boot to /init, the disk and rng checks and a clean poweroff",
        );
        assert!(log.contains("cgvm-guest: init started"), "{}", ctx());
        assert!(log.contains("cgvm-guest: cpus 2"), "{}", ctx());
        assert!(
            log.contains("cgvm-guest: virtio-mmio devices: 2 (ACPI LNRO0005: 2,"),
            "both devices found through our DSDT: {}",
            ctx()
        );
        assert!(log.contains("cgvm-guest: disk ok"), "{}", ctx());
        assert!(log.contains("cgvm-guest: rng ok"), "{}", ctx());
        assert!(log.contains("cgvm-guest: all checks passed"), "{}", ctx());
        assert_eq!(r.status, Some(0), "poweroff: {}", ctx());
        assert!(r.stderr.contains("guest powered off"), "{}", ctx());
    }
}
