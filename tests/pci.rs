//! Every probe check on both transports, through the real binary: the same machine (two
//! disks, one per I/O engine, an entropy device, a vsock and a tap in a network namespace the
//! test creates) booted with `--transport pci` and with `--transport mmio`; rootless
//! networking through passt on both; and each transport refusing to be mistaken for the other.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::netns::NetNs;
use common::vsock::{connect, echo};
use common::*;

const MAC: &str = "02:00:00:00:00:05";

/// A disk image of `mib` MiB.
fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create the image");
    f.set_len(mib << 20).expect("size the image");
    p
}

fn spawn(ns: Option<&NetNs>, dir: &Path, args: &[String]) -> (Child, PathBuf) {
    let console = dir.join("console.txt");
    let _ = std::fs::remove_file(&console);
    let bin = Path::new(env!("CARGO_BIN_EXE_cgvm"));
    let mut cmd = match ns {
        Some(ns) => ns.command(bin),
        None => std::process::Command::new(bin),
    };
    cmd.args([
        "run",
        "--kernel",
        probe_elf().to_str().expect("utf-8"),
        "--memory",
        "128",
        "--timeout",
        "60",
        "--console",
        &format!("file:{}", console.display()),
    ])
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    (cmd.spawn().expect("spawn cgvm"), console)
}

fn finish(child: Child, console: &Path) -> (Option<i32>, String, String) {
    let (code, err) = finish_child(child, Duration::from_secs(90));
    let out = std::fs::read_to_string(console).unwrap_or_default();
    (code, err, out)
}

/// Boots every check on `transport` and returns the console.
fn every_check_on(transport: &str) -> String {
    let d = scratch(&format!("pci-every-check-{transport}"));
    let ns = NetNs::new();
    ns.tap("tapq", Some("10.0.2.2/24"), &[]);
    let sync = image(&d, "sync.img", 8);
    let uring = image(&d, "uring.img", 8);
    let uds = d.join("v.sock");
    let checks = if transport == "pci" {
        "boot,pci,blk,rng,net,vsock"
    } else {
        "boot,blk,rng,net,vsock"
    };
    let args: Vec<String> = [
        "--transport",
        transport,
        "--disk",
        &format!("{},engine=sync,id=s", sync.display()),
        // persist: an ephemeral disk's sparse overlay would use the sync engine.
        "--disk",
        &format!("{},persist,engine=uring,id=u", uring.display()),
        "--rng",
        "--vsock",
        &format!("3,uds={}", uds.display()),
        "--net",
        &format!("tap:tapq,mac={MAC}"),
        "--cmdline",
        &format!("probe.tests={checks} probe.transport={transport} probe.blk_id=s,u"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (child, console) = spawn(Some(&ns), &d, &args);
    // The vsock check waits for a host connection to guest port 52 and echoes it.
    let mut s = connect(&uds, 52);
    let payload: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
    echo(&mut s, &payload);
    drop(s);
    let (code, err, out) = finish(child, &console);
    assert_eq!(code, Some(0), "{transport}: {err}\n{out}");
    let n = checks.split(',').count();
    assert!(
        out.contains(&format!("probe: {n} passed, 0 failed")),
        "{transport}: {out}"
    );
    out
}

/// The lines of `out` that report a passed virtio check.
fn device_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            ["blk ok", "rng ok", "net ok", "vsock ok"]
                .iter()
                .any(|c| l.starts_with(&format!("probe: {c}")))
        })
        .collect()
}

#[test]
fn every_probe_check_passes_on_virtio_pci() {
    let out = every_check_on("pci");
    let lines = device_lines(&out);
    assert_eq!(lines.len(), 4, "{out}");
    for l in &lines {
        assert!(l.contains("virtio-pci 00:0"), "not on PCI: {l}");
        assert!(!l.contains("virtio-mmio"), "{l}");
    }
    // Disks first (slots 1 and 2), then rng, vsock, net; both disks checked.
    let pci = out
        .lines()
        .find(|l| l.starts_with("probe: pci ok"))
        .expect("the pci line");
    for f in [
        "00:00.0 1b36:0008 host bridge",
        "00:01.0 1af4:1042 blk",
        "00:02.0 1af4:1042 blk",
        "00:03.0 1af4:1044 rng",
        "00:04.0 1af4:1053 vsock",
        "00:05.0 1af4:1041 net",
        "identical through 0xcf8/0xcfc",
        "ECAM 0xe0000000 from the MCFG",
    ] {
        assert!(pci.contains(f), "{f:?} not in {pci}");
    }
    let blk = lines
        .iter()
        .find(|l| l.starts_with("probe: blk ok"))
        .expect("blk");
    assert!(blk.contains("2 devices"), "{blk}");
    assert!(blk.contains("MSI-X masked"), "{blk}");
}

#[test]
fn every_probe_check_passes_on_virtio_mmio() {
    let out = every_check_on("mmio");
    let lines = device_lines(&out);
    assert_eq!(lines.len(), 4, "{out}");
    for l in &lines {
        assert!(l.contains("virtio-mmio at 0xc000"), "not on MMIO: {l}");
        assert!(!l.contains("virtio-pci"), "{l}");
    }
}

#[test]
fn rootless_networking_works_on_both_transports() {
    for transport in ["pci", "mmio"] {
        let d = scratch(&format!("pci-passt-{transport}"));
        let args: Vec<String> = [
            "--transport",
            transport,
            "--net",
            &format!("user,mac={MAC}"),
            "--cmdline",
            &format!("probe.tests=net probe.net=dhcp probe.transport={transport}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, console) = spawn(None, &d, &args);
        let (code, err, out) = finish(child, &console);
        assert_eq!(code, Some(0), "{transport}: {err}\n{out}");
        assert!(out.contains("dhcp offer"), "{transport}: {out}");
        assert!(
            out.contains(&format!("virtio-{transport}")),
            "{transport}: {out}"
        );
    }
}

#[test]
fn a_transport_is_not_mistaken_for_the_other() {
    // The probe demanding PCI on an MMIO machine finds no MCFG and no PCI device; demanding
    // MMIO on a PCI machine finds no virtio-mmio device. Each fails its check, naming why.
    let d = scratch("pci-mismatch");
    for (machine, wanted, checks, expect) in [
        ("mmio", "pci", "pci", "no MCFG"),
        ("pci", "mmio", "rng", "rng FAIL"),
    ] {
        let args: Vec<String> = [
            "--transport",
            machine,
            "--rng",
            "--cmdline",
            &format!("probe.tests={checks} probe.transport={wanted}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, console) = spawn(None, &d, &args);
        let (code, err, out) = finish(child, &console);
        assert_eq!(code, Some(1), "{machine}/{wanted}: {err}\n{out}");
        assert!(out.contains(expect), "{machine}/{wanted}: {out}");
    }
    let r = cgvm_run(&[
        "--kernel",
        probe_elf().to_str().expect("utf-8"),
        "--transport",
        "isa",
    ]);
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr.contains("transport 'isa': expected mmio or pci"),
        "{}",
        r.both()
    );
}

/// Boots `pci,blk,rng` on a PCI machine with one disk and an entropy device, the probe's
/// virtio-pci transport taking interrupts as `probe.pci_irq=mode` says; the console.
fn boot_with_pci_irq(d: &Path, mode: &str) -> String {
    let disk = image(d, &format!("irq-{mode}.img"), 8);
    let args: Vec<String> = [
        "--transport",
        "pci",
        "--disk",
        &disk.display().to_string(),
        "--rng",
        "--cmdline",
        &format!("probe.tests=pci,blk,rng probe.transport=pci probe.pci_irq={mode}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (child, console) = spawn(None, d, &args);
    let (code, err, out) = finish(child, &console);
    assert_eq!(code, Some(0), "{mode}: {err}\n{out}");
    assert!(out.contains("probe: 3 passed, 0 failed"), "{mode}: {out}");
    out
}

/// The `blk` and `rng` lines of `out`, which must exist.
fn blk_and_rng(out: &str) -> [&str; 2] {
    ["probe: blk ok", "probe: rng ok"].map(|start| {
        out.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} line in {out}"))
    })
}

/// The GSI in "INTx GSI N" of a check line.
fn intx_gsi(line: &str) -> u32 {
    let rest = line
        .split("INTx GSI ")
        .nth(1)
        .unwrap_or_else(|| panic!("no INTx GSI in {line}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no GSI number in {line}"))
}

#[test]
fn virtio_pci_interrupts_through_intx_and_msix() {
    let d = scratch("pci-irq");
    // INTx, polled: MSI-X disabled, every vector NO_VECTOR; the interrupt pin is INTA and the
    // interrupt line the IOAPIC pin of the slot (GSI 16 + slot % 8: the disk in slot 1, the
    // entropy device in slot 2); after a request the ISR's queue bit is set, a second read
    // gives 0, and the PBA stays empty (any of these otherwise fails the check).
    let out = boot_with_pci_irq(&d, "intx");
    let [blk, rng] = blk_and_rng(&out);
    for (line, slot) in [(blk, 1), (rng, 2)] {
        assert!(line.contains(&format!("00:0{slot}.0 (INTx GSI ")), "{line}");
        assert!(line.contains(", ISR 0x1)"), "{line}");
        assert!(!line.contains("MSI-X"), "{line}");
        let gsi = intx_gsi(line);
        assert!((16..=23).contains(&gsi), "{line}");
        assert_eq!(gsi, 16 + slot % 8, "{line}");
    }

    // MSI-X unmasked with interrupts on: the message the probe wrote in the table (the local
    // APIC, vector 0x40 + entry) arrives and the guest's ring-0 handler takes it.
    let out = boot_with_pci_irq(&d, "msix");
    for line in blk_and_rng(&out) {
        assert!(
            line.contains("(MSI-X vector 1 delivered as interrupt 0x41, "),
            "{line}"
        );
    }

    // INTx through the IOAPIC (the GSI's redirection entry set to vector 0x80, level): the
    // interrupt arrives and its handler reads the ISR's queue bit before the EOI.
    let out = boot_with_pci_irq(&d, "intx-ioapic");
    let [blk, rng] = blk_and_rng(&out);
    for (line, gsi) in [(blk, 17), (rng, 18)] {
        assert!(
            line.contains(&format!(
                "(INTx GSI {gsi} delivered through the IOAPIC as interrupt 0x80, "
            )),
            "{line}"
        );
        assert!(line.contains("ISR 0x1)"), "{line}");
    }

    // The default is today's masked MSI-X; a mode the probe does not know fails the check.
    let out = boot_with_pci_irq(&d, "msix-masked");
    for line in blk_and_rng(&out) {
        assert!(line.contains("(MSI-X masked, vector 1 pending)"), "{line}");
    }
    let args: Vec<String> = [
        "--transport",
        "pci",
        "--rng",
        "--cmdline",
        "probe.tests=rng probe.pci_irq=msi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (child, console) = spawn(None, &d, &args);
    let (code, err, out) = finish(child, &console);
    assert_eq!(code, Some(1), "{err}\n{out}");
    assert!(
        out.contains("rng FAIL probe.pci_irq=msi: expected msix-masked, intx, msix or intx-ioapic"),
        "{out}"
    );
}

#[test]
fn the_config_file_and_firecrackers_flag_choose_the_transport() {
    let d = scratch("pci-config-file");
    let write = |name: &str, transport: Option<&str>| -> PathBuf {
        let mut machine = serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64});
        if let Some(t) = transport {
            machine["transport"] = t.into();
        }
        let cfg = serde_json::json!({
            "boot-source": {
                "kernel_image_path": probe_elf(),
                "boot_args": "probe.tests=rng"
            },
            "machine-config": machine,
            "entropy": {}
        });
        let p = d.join(name);
        std::fs::write(&p, cfg.to_string()).expect("write the config file");
        p
    };
    let pci = write("pci.json", Some("pci"));
    let plain = write("plain.json", None);
    let bad = write("bad.json", Some("isa"));
    for (extra, file, expect) in [
        (None, &pci, "virtio-pci 00:01.0"),
        (Some("--enable-pci"), &plain, "virtio-pci 00:01.0"),
        // An ELF kernel without a choice gets MMIO.
        (None, &plain, "virtio-mmio at 0xc0001000"),
    ] {
        let mut c = cgvm();
        c.args(["--no-api", "--config-file", file.to_str().expect("utf-8")]);
        c.args(extra);
        let r = run_with_limit(c, Duration::from_secs(60));
        assert_eq!(
            r.status,
            Some(0),
            "{extra:?} {}: {}",
            file.display(),
            r.both()
        );
        assert!(
            r.stdout.contains("probe: rng ok") && r.stdout.contains(expect),
            "{extra:?} {}: {}",
            file.display(),
            r.both()
        );
    }
    let mut c = cgvm();
    c.args(["--no-api", "--config-file", bad.to_str().expect("utf-8")]);
    let r = run_with_limit(c, Duration::from_secs(60));
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr
            .contains("unknown variant `isa`, expected `mmio` or `pci`"),
        "{}",
        r.both()
    );
}
