//! The console on a real terminal: `script` (util-linux) gives cgvm a pseudo-terminal, as a
//! developer's shell would. cgvm must put it in raw mode, honour Ctrl-A x, and give it back
//! exactly as it found it, whichever way the run ends.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `cgvm_args` under `script` with `input` typed after a short delay; returns the
/// terminal settings before and after, cgvm's status and everything on the terminal.
fn on_a_terminal(name: &str, cgvm_args: &str, input: &str) -> (String, String, String) {
    let d = scratch(&format!("tty-{name}"));
    let (before, after) = (d.join("stty.before"), d.join("stty.after"));
    let inner = format!(
        "stty -g > {b}; {cgvm} {cgvm_args}; echo cgvm-status=\\$?; stty -g > {a}",
        b = before.display(),
        a = after.display(),
        cgvm = env!("CARGO_BIN_EXE_cgvm"),
    );
    let outer = format!("(sleep 1; printf '{input}') | script -qec \"{inner}\" /dev/null");
    let mut c = Command::new("bash");
    c.args(["-c", &outer]);
    let r = run_with_limit(c, Duration::from_secs(60));
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    (
        read(&before),
        read(&after),
        format!("{}{}", r.stdout, r.stderr),
    )
}

#[test]
fn ctrl_a_x_quits_and_the_terminal_is_restored() {
    let d = scratch("tty-spin");
    let k = tiny_kernel(&d, "spin.elf", &[0xeb, 0xfe]);
    let (before, after, screen) = on_a_terminal(
        "quit",
        &format!("run --kernel {} --timeout 30", k.display()),
        "\\001x",
    );
    assert!(
        screen.contains("quit from the console (Ctrl-A x)"),
        "{screen}"
    );
    assert!(screen.contains("cgvm-status=130"), "{screen}");
    assert!(!before.is_empty(), "{screen}");
    assert_eq!(before, after, "terminal settings restored");
}

#[test]
fn a_guest_exit_restores_the_terminal_too() {
    let probe = probe_elf().display().to_string();
    let (before, after, screen) = on_a_terminal(
        "guest-exit",
        &format!("run --kernel {probe} --cmdline 'probe.tests=boot probe.exit=7' --timeout 30"),
        "",
    );
    assert!(screen.contains("probe: boot ok"), "{screen}");
    assert!(screen.contains("cgvm-status=7"), "{screen}");
    assert_eq!(before, after, "terminal settings restored");
}

/// A ring-0 guest that polls COM1 for one byte and exits through the exit device with it.
const ECHO_ONE_BYTE: &[u8] = &[
    0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status)
    0xec, // in al, dx
    0xa8, 0x01, // test al, 1 (data ready)
    0x74, 0xf7, // jz back to the start
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8 (receive buffer)
    0xec, // in al, dx
    0xe6, 0xf4, // out 0xf4, al
    0xeb, 0xfe, // jmp .
];

#[test]
fn typed_input_reaches_the_guest() {
    let d = scratch("tty-input");
    let k = tiny_kernel(&d, "echo.elf", ECHO_ONE_BYTE);
    let (before, after, screen) = on_a_terminal(
        "typed",
        &format!("run --kernel {} --timeout 30", k.display()),
        "A",
    );
    assert!(
        screen.contains("cgvm-status=65"),
        "the guest read 'A': {screen}"
    );
    assert_eq!(before, after);
}

#[test]
fn piped_input_reaches_the_guest() {
    use std::io::Write;
    let d = scratch("pipe-input");
    let k = tiny_kernel(&d, "echo.elf", ECHO_ONE_BYTE);
    let mut child = cgvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--timeout", "30"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"B").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(66),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
