//! The probe guest through the real `cgvm` binary: its checks, its exit statuses, the serial
//! console and the boot timeline.

mod common;

use common::*;

fn probe() -> String {
    probe_elf().to_string_lossy().into_owned()
}

#[test]
fn boot_check_passes_and_probe_exit_sets_the_status() {
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot probe.exit=7",
        "--cpus",
        "2",
        "--memory",
        "256",
        "--timeout",
        "30",
        "--console",
        "tty",
    ]);
    assert_eq!(r.status, Some(7), "{}", r.both());
    assert!(r.stdout.contains("probe: boot ok"), "{}", r.both());
    assert!(
        r.stderr
            .contains("guest exited with status 7 (exit device)"),
        "{}",
        r.both()
    );
}

#[test]
fn boot_check_alone_exits_zero_and_verifies_memory_and_cpus() {
    for (cpus, mem) in [("1", "64"), ("2", "256"), ("4", "1024"), ("32", "512")] {
        let cmdline = format!("probe.tests=boot probe.cpus={cpus} probe.mem={mem}");
        let r = cgvm_run(&[
            "--kernel",
            &probe(),
            "--cmdline",
            &cmdline,
            "--cpus",
            cpus,
            "--memory",
            mem,
            "--timeout",
            "30",
        ]);
        assert_eq!(r.status, Some(0), "{cpus} vCPUs, {mem} MiB: {}", r.both());
        assert!(r.stdout.contains("probe: boot ok"), "{}", r.both());
        assert!(r.stdout.contains("1 passed, 0 failed"), "{}", r.both());
    }
}

#[test]
fn memory_above_the_mmio_hole_is_seen_by_the_guest() {
    // 3.5 GiB: RAM continues at 4 GiB; e820 and CMOS must agree.
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot probe.mem=3584 probe.cpus=1",
        "--memory",
        "3584",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
}

#[test]
fn a_wrong_expectation_fails_the_check_with_status_1() {
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot probe.cpus=3",
        "--cpus",
        "2",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.status, Some(1), "{}", r.both());
    assert!(r.stdout.contains("probe: boot FAIL"), "{}", r.both());
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=nosuch",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.status, Some(1), "{}", r.both());
    assert!(
        r.stdout.contains("probe: nosuch FAIL unknown check"),
        "{}",
        r.both()
    );
}

#[test]
fn i8042_reset_ends_the_run_with_zero() {
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot probe.exit=reset",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    assert!(r.stderr.contains("guest reset"), "{}", r.both());
}

#[test]
fn console_file_receives_the_serial_output() {
    let d = scratch("console-file");
    let log = d.join("serial.log");
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot",
        "--console",
        &format!("file:{}", log.display()),
        "--timeout",
        "30",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    let text = std::fs::read_to_string(&log).expect("console file");
    assert!(text.contains("probe: boot ok"), "{text}");
    assert!(
        !r.stdout.contains("probe:"),
        "nothing on stdout: {}",
        r.both()
    );
}

#[test]
fn timeline_reports_first_instruction_boot_complete_and_stop() {
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot",
        "--timeout",
        "30",
        "--timeline",
        "--console",
        "none",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("cgvm: timeline-monotonic-ns"))
        .unwrap_or_else(|| panic!("no machine-readable timeline: {}", r.both()));
    let field = |k: &str| -> u64 {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap();
        v.parse()
            .unwrap_or_else(|_| panic!("{k} missing in {line}"))
    };
    let (start, first, booted, stop) = (
        field("vmm-start"),
        field("first-instruction"),
        field("boot-complete"),
        field("guest-stop"),
    );
    assert!(
        start <= first && first <= booted && booted <= stop,
        "{line}"
    );
    assert!(
        r.stderr.contains("cgvm: timeline boot-complete"),
        "{}",
        r.both()
    );
}

#[test]
fn timeout_ends_a_spinning_guest_with_124() {
    let d = scratch("timeout");
    let k = tiny_kernel(&d, "spin.elf", &[0xeb, 0xfe]); // jmp .
    let r = cgvm_run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--timeout",
        "1",
        "--console",
        "none",
    ]);
    assert_eq!(r.status, Some(124), "{}", r.both());
    assert!(r.stderr.contains("timeout"), "{}", r.both());
    assert!(r.took.as_secs_f64() < 20.0, "took {:?}", r.took);
}

#[test]
fn exit_device_status_comes_from_the_guest_byte() {
    let d = scratch("exitdev");
    // mov al, 42; out 0xf4, al; jmp .
    let k = tiny_kernel(&d, "exit42.elf", &[0xb0, 42, 0xe6, 0xf4, 0xeb, 0xfe]);
    let r = cgvm_run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--timeout",
        "20",
        "--console",
        "none",
    ]);
    assert_eq!(r.status, Some(42), "{}", r.both());
}

#[test]
fn a_triple_fault_is_reported_with_vcpu_rip_and_bytes() {
    let d = scratch("triple");
    // ud2 with the boot IDT empty: #UD cannot be delivered, then #DF, then a triple fault.
    let k = tiny_kernel(&d, "ud2.elf", &[0x0f, 0x0b]);
    let r = cgvm_run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--timeout",
        "20",
        "--console",
        "none",
    ]);
    assert_eq!(r.status, Some(121), "{}", r.both());
    assert!(
        r.stderr.contains("vCPU 0 stopped: triple fault"),
        "{}",
        r.both()
    );
    assert!(r.stderr.contains("RIP 0x0000000001000000"), "{}", r.both());
    assert!(
        r.stderr.contains("instruction bytes: 0f 0b"),
        "{}",
        r.both()
    );
}

#[test]
fn an_instruction_the_host_cannot_run_is_reported_not_spun_on() {
    let d = scratch("int3");
    // nop; int3 at ring 0. On this PVM host KVM cannot emulate it (internal error); with
    // hardware virtualization it is a breakpoint exception with no IDT (triple fault).
    let k = tiny_kernel(&d, "int3.elf", &[0x90, 0xcc, 0x90]);
    let r = cgvm_run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--timeout",
        "20",
        "--console",
        "none",
    ]);
    assert_eq!(r.status, Some(121), "{}", r.both());
    if pvm_host() {
        assert!(
            r.stderr
                .contains("KVM internal error, suberror 1 (emulation failure)"),
            "{}",
            r.both()
        );
        assert!(r.stderr.contains("RIP 0x0000000001000001"), "{}", r.both());
        assert!(
            r.stderr.contains("instruction bytes: cc 90"),
            "{}",
            r.both()
        );
    } else {
        assert!(r.stderr.contains("vCPU 0 stopped:"), "{}", r.both());
    }
}

#[test]
fn a_terminating_signal_stops_the_guest_with_128_plus_n() {
    let d = scratch("sigterm");
    let k = tiny_kernel(&d, "spin.elf", &[0xeb, 0xfe]);
    let child = cgvm()
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--timeout",
            "60",
            "--console",
            "none",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let it start the guest, then ask it to stop as a supervisor would.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
}

#[test]
fn acpi_poweroff_found_through_the_tables_ends_the_run_with_zero() {
    // The probe finds the FADT's sleep control register and \_S5 in the DSDT, as an OS does.
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--cmdline",
        "probe.tests=boot probe.exit=poweroff",
        "--timeout",
        "30",
        "--log-level",
        "info",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    assert!(
        r.stderr.contains("guest powered off (ACPI)"),
        "{}",
        r.both()
    );
    assert!(
        r.stderr.contains("poweroff (ACPI S5)"),
        "through the sleep register: {}",
        r.both()
    );
}
