//! A stock Debian kernel and the busybox initramfs of resources/linux-guest through the real
//! `cgvm` binary, twice at once: with the default transport for a bzImage (virtio-pci) and with
//! `--transport mmio`.
//!
//! Each guest gets the build's ext4 image as a read-only virtio disk and a virtio entropy device.
//! Where /dev/kvm is hardware virtualization both boot to /init, which loads the virtio modules
//! (virtio_pci finds the devices on our PCI host bridge, virtio_mmio through our DSDT), lists the
//! PCI functions, checks the disk's file and the entropy device, and powers off: status 0. The
//! PCI guest also gets a network interface on a tap in a namespace the test makes, brings it up
//! with a static address and pings the namespace's side. On a PVM host (guest ring 0 emulated, see
//! docs/DESIGN.md) the kernel gets through early boot and then stops on an instruction KVM cannot
//! emulate, long before the ACPI bus scan: the test asserts the early-boot lines that prove our
//! boot parameters, e820 map and ACPI tables were read (for PCI: no device entries on the command
//! line, the ECAM window reserved, an MCFG table; for MMIO: the devices' command-line entries),
//! and cgvm's one-line report of the stop. The test states on stderr which of the two it ran.
//!
//! Why both at once, on two threads: on a PVM host each run is about 135 s of one core (the
//! emulated vCPU 0; nothing else runs) and ends by itself on the emulation failure, with the
//! early-boot lines in its last minute, so a shorter --timeout would save little. One after the
//! other the two take about 4.5 minutes of the CI's budget; side by side on the 2-core build
//! machine about 3.3 (each slows to about 195 s), and no longer than one where there are more
//! cores.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::NetNs;
use common::*;

/// The command line both guests get; cgvm adds nothing to it with PCI, and one
/// `virtio_mmio.device=` entry per device with MMIO.
const CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 cgvm.cpus=2 cgvm.disk=1 cgvm.rng=1";

/// The PCI guest's network interface (hardware virtualization only): a tap in a namespace whose
/// side has `NET_PEER`; the guest takes `NET_GUEST` and pings the peer.
const NET_TAP: &str = "taplinux";
const NET_PEER: &str = "10.0.2.2";
const NET_PEER_CIDR: &str = "10.0.2.2/24";
const NET_GUEST_CIDR: &str = "10.0.2.15/24";
const NET_GUEST_MAC: &str = "02:00:00:00:00:07";

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

/// The tap in its namespace that the PCI guest's interface uses.
struct GuestNet {
    ns: NetNs,
    /// The tap's MAC: what the guest's ARP table should hold for `NET_PEER`.
    peer_mac: String,
}

impl GuestNet {
    fn new() -> Self {
        let ns = NetNs::new();
        ns.tap(NET_TAP, Some(NET_PEER_CIDR), &[]);
        let peer_mac = ns.mac_of(NET_TAP);
        Self { ns, peer_mac }
    }
}

/// One finished `cgvm run` of the guest and its serial console.
struct Boot {
    transport: &'static str,
    /// The command line given to cgvm.
    cmdline: String,
    r: Finished,
    log: String,
}

impl Boot {
    /// cgvm's output and the console, for assertion messages.
    fn ctx(&self) -> String {
        format!(
            "--transport {}\n{}\n--- serial\n{}",
            self.transport,
            self.r.both(),
            self.log
        )
    }

    fn assert_line(&self, line: &str, what: &str) {
        assert!(
            self.log.lines().any(|l| l.trim_end() == line),
            "{what}: no line {line:?}: {}",
            self.ctx()
        );
    }

    /// A line that starts with `start` and ends with `end`.
    fn assert_line_between(&self, start: &str, end: &str, what: &str) {
        assert!(
            self.log
                .lines()
                .map(str::trim_end)
                .any(|l| l.starts_with(start) && l.ends_with(end)),
            "{what}: no line {start:?}...{end:?}: {}",
            self.ctx()
        );
    }

    fn assert_has(&self, text: &str, what: &str) {
        assert!(self.log.contains(text), "{what} ({text}): {}", self.ctx());
    }

    /// The kernel's echo of the command line it booted with.
    fn echoed_cmdline(&self) -> &str {
        let line = self
            .log
            .lines()
            .find(|l| l.contains("] Command line: "))
            .unwrap_or_else(|| panic!("no command-line echo: {}", self.ctx()));
        line.split_once("] Command line: ")
            .map_or("", |(_, c)| c)
            .trim_end()
    }
}

/// Runs the guest with `transport`; with `net`, cgvm runs in its namespace with one interface on
/// its tap and the guest is told to bring it up.
fn boot(guest: &Path, dir: &Path, transport: &'static str, net: Option<&GuestNet>) -> Boot {
    let serial = dir.join(format!("serial-{transport}.log"));
    let mut cmdline = CMDLINE.to_string();
    let mut c = match net {
        Some(n) => {
            cmdline.push_str(&format!(
                " cgvm.net_ip={NET_GUEST_CIDR} cgvm.net_peer={NET_PEER}"
            ));
            let mut c = n.ns.command(Path::new(env!("CARGO_BIN_EXE_cgvm")));
            c.stdin(Stdio::null());
            c
        }
        None => cgvm(),
    };
    let disk = guest.join("disk.ext4");
    let disk_spec = format!("{},ro", disk.display());
    assert!(
        !disk.display().to_string().contains(','),
        "--disk cannot name {}",
        disk.display()
    );
    c.arg("run")
        .arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args(["--transport", transport])
        .args(["--cmdline", &cmdline])
        .args(["--cpus", "2", "--memory", "256", "--timeout", "600"])
        .args(["--disk", &disk_spec, "--rng"])
        .arg("--console")
        .arg(format!("file:{}", serial.display()));
    if net.is_some() {
        c.args(["--net", &format!("tap:{NET_TAP},mac={NET_GUEST_MAC}")]);
    }
    let r = run_with_limit(c, Duration::from_secs(900));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    Boot {
        transport,
        cmdline,
        r,
        log,
    }
}

/// Early boot, on every host: the kernel read the boot parameters, e820 map and ACPI tables
/// cgvm gave it.
fn assert_early_boot(b: &Boot) {
    b.assert_has("Linux version 6.", "kernel banner");
    for e820 in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    ] {
        b.assert_has(e820, "our e820 map");
    }
    for table in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT",
        "ACPI: FACP",
        "ACPI: DSDT",
        "ACPI: APIC",
    ] {
        b.assert_has(table, "our ACPI tables");
    }
    b.assert_has("smpboot: Allowing 2 CPUs", "CPU count from our MADT");
}

/// PCI: our command line as given, the ECAM window reserved in e820 (and so kept out of the
/// range the kernel offers PCI BARs), and the MCFG table that points at it.
fn assert_early_boot_pci(b: &Boot) {
    assert_early_boot(b);
    let echoed = b.echoed_cmdline();
    assert_eq!(
        echoed,
        b.cmdline,
        "our command line, with no device entries: {}",
        b.ctx()
    );
    assert!(
        !echoed.contains("virtio_mmio.device="),
        "no virtio-mmio entries with PCI: {}",
        b.ctx()
    );
    b.assert_has(
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
        "the ECAM window reserved in our e820 map",
    );
    b.assert_has(
        "[mem 0x10000000-0xdfffffff] available for PCI devices",
        "the gap above RAM ends at the ECAM window",
    );
    b.assert_has("ACPI: MCFG", "our MCFG table");
}

/// MMIO: our command line, then one entry per virtio-mmio device: the disk first, then the
/// entropy device.
fn assert_early_boot_mmio(b: &Boot) {
    assert_early_boot(b);
    let echoed = b.echoed_cmdline();
    assert!(
        echoed.starts_with(&format!("{} virtio_mmio.device=", b.cmdline)),
        "our command line, then the devices' entries: {}",
        b.ctx()
    );
    for entry in [
        "virtio_mmio.device=4K@0xc0001000:",
        "virtio_mmio.device=4K@0xc0002000:",
    ] {
        assert!(
            echoed.contains(entry),
            "the devices' command-line entries ({entry}): {}",
            b.ctx()
        );
    }
}

/// PVM: cgvm's report of the emulation failure that ends the run.
fn assert_emulation_failure(b: &Boot) {
    assert_eq!(b.r.status, Some(121), "{}", b.ctx());
    let report =
        b.r.stderr
            .lines()
            .find(|l| l.starts_with("cgvm: vCPU"))
            .unwrap_or_else(|| panic!("no vCPU stop report: {}", b.ctx()));
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
}

/// Hardware virtualization: /init ran, its checks passed and the guest powered off.
fn assert_checks_passed(b: &Boot) {
    b.assert_has("cgvm-guest: init started", "/init ran");
    b.assert_line("cgvm-guest: cpus 2", "/init's CPU count");
    b.assert_has("cgvm-guest: modules ok", "every module loaded");
    b.assert_has("cgvm-guest: disk ok", "the disk check");
    b.assert_has("cgvm-guest: rng ok", "the entropy check");
    b.assert_line("cgvm-guest: all checks passed", "the verdict");
    assert_eq!(b.r.status, Some(0), "poweroff: {}", b.ctx());
    assert!(b.r.stderr.contains("guest powered off"), "{}", b.ctx());
}

#[test]
fn debian_kernel_boots_as_far_as_this_host_allows() {
    let guest = linux_guest();
    let d = scratch("linux-boot");
    let pvm = pvm_host();
    // The namespace outlives both runs (it is dropped after them).
    let net = (!pvm).then(GuestNet::new);
    let (pci, mmio) = std::thread::scope(|s| {
        let pci = s.spawn(|| boot(&guest, &d, "pci", net.as_ref()));
        let mmio = s.spawn(|| boot(&guest, &d, "mmio", None));
        let join = |h: std::thread::ScopedJoinHandle<'_, Boot>| {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        };
        (join(pci), join(mmio))
    });
    let took = format!(
        "pci run {:.0} s, mmio run {:.0} s, side by side",
        pci.r.took.as_secs_f64(),
        mmio.r.took.as_secs_f64()
    );

    assert_early_boot_pci(&pci);
    assert_early_boot_mmio(&mmio);

    if pvm {
        announce(&format!(
            "PVM host (no hardware virtualization): asserted early boot (PCI: ECAM in e820, MCFG; \
             MMIO: the command-line entries) and the emulation-failure reports; {took}"
        ));
        assert_emulation_failure(&pci);
        assert_emulation_failure(&mmio);
        return;
    }

    announce(&format!(
        "hardware virtualization: asserted boots to /init, the devices on PCI and on MMIO, the \
         disk, rng and (PCI) net checks and clean poweroffs; {took}"
    ));
    let net = net.as_ref().expect("the namespace is made on this branch");
    // PCI: every device is a function behind our host bridge, driven by virtio_pci; none is
    // on MMIO. Functions are numbered in cgvm's order: disks, the entropy device, interfaces.
    // (The entropy device's class is left open: "other" is spelled 0x00ff by QEMU, 0xff00 by
    // cgvm today.)
    pci.assert_has(
        "cgvm-guest: lspci: 00:00.0 Class [0600]: Device [1b36:0008]",
        "our host bridge",
    );
    for (start, end) in [
        (
            "00:01.0 Class [0100]:",
            "Device [1af4:1042] (rev 01), driver virtio-pci",
        ),
        (
            "00:02.0 Class [",
            "]: Device [1af4:1044] (rev 01), driver virtio-pci",
        ),
        (
            "00:03.0 Class [0200]:",
            "Device [1af4:1041] (rev 01), driver virtio-pci",
        ),
    ] {
        pci.assert_line_between(
            &format!("cgvm-guest: lspci: {start}"),
            end,
            "a virtio-pci function",
        );
    }
    pci.assert_line(
        "cgvm-guest: virtio-pci devices: 3 (00:01.0 blk, 00:02.0 rng, 00:03.0 net)",
        "the virtio-pci functions",
    );
    pci.assert_has(
        "cgvm-guest: virtio-mmio devices: 0 ",
        "no virtio-mmio devices with PCI",
    );
    pci.assert_has(
        &format!(
            "cgvm-guest: net ok (eth0 {NET_GUEST_MAC}, {NET_GUEST_CIDR}: {NET_PEER} is at {}, ",
            net.peer_mac
        ),
        "the interface came up and the tap's side answered",
    );
    assert_checks_passed(&pci);

    // MMIO: both devices found through our DSDT, and no PCI at all.
    mmio.assert_has(
        "cgvm-guest: virtio-mmio devices: 2 (ACPI LNRO0005: 2,",
        "both devices found through our DSDT",
    );
    mmio.assert_line(
        "cgvm-guest: virtio-pci devices: 0",
        "no virtio-pci devices with MMIO",
    );
    assert_checks_passed(&mmio);
}
