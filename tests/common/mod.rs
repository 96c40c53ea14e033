//! Helpers for the end-to-end tests: the `cgvm` binary, the probe guest, tiny hand-made
//! kernels, and running a command with a deadline so that no test can hang.

#![allow(dead_code)]

pub mod api;
pub mod netns;
pub mod vsock;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `cgvm` binary cargo built for these tests.
pub fn cgvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cgvm"));
    c.stdin(Stdio::null());
    c
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The probe guest, built once per test binary with resources/probe-guest/build.sh.
pub fn probe_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe-guest.elf");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new("bash")
            .arg(root.join("resources/probe-guest/build.sh"))
            .arg(&out)
            .env(
                "PROBE_TARGET_DIR",
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe-target"),
            )
            .status()
            .expect("run resources/probe-guest/build.sh");
        assert!(
            status.success(),
            "resources/probe-guest/build.sh failed: {status}"
        );
        out
    })
}

/// `run --kernel PROBE --memory 64 --timeout 60 --console file:CONSOLE`: the start of the
/// probe runs the device tests make; they add the devices and the command line.
pub fn probe_run_args(console: &Path) -> Vec<String> {
    [
        "run",
        "--kernel",
        probe_elf().to_str().expect("utf-8"),
        "--memory",
        "64",
        "--timeout",
        "60",
        "--console",
        &format!("file:{}", console.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A minimal ELF64 executable with one loadable segment at `paddr` holding `code`, entered
/// at its first byte: a kernel as far as the Linux 64-bit boot protocol cares.
pub fn tiny_elf(code: &[u8], paddr: u64) -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2;
    v[5] = 1;
    v[6] = 1;
    v[16..18].copy_from_slice(&2u16.to_le_bytes());
    v[18..20].copy_from_slice(&62u16.to_le_bytes());
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[24..32].copy_from_slice(&paddr.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes());
    v[52..54].copy_from_slice(&64u16.to_le_bytes());
    v[54..56].copy_from_slice(&56u16.to_le_bytes());
    v[56..58].copy_from_slice(&1u16.to_le_bytes());
    let mut ph = vec![0u8; 56];
    ph[..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&7u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    v.extend_from_slice(&ph);
    v.extend_from_slice(code);
    v
}

/// Writes a tiny kernel into `dir` and returns its path.
pub fn tiny_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code, 0x100_0000)).expect("write tiny kernel");
    p
}

/// What a finished command left.
pub struct Finished {
    /// Exit status (None: killed by a signal).
    pub status: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub took: Duration,
}

impl Finished {
    /// Both streams, for assertion messages.
    pub fn both(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Waits for `child` to end; after `limit` kills and reaps it and returns `None`.
pub fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a child started with a piped stderr (failing the test after `limit`); its exit
/// code and everything it wrote to stderr.
pub fn finish_child(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let status = wait_with_limit(&mut child, limit).expect("cgvm did not end");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.code(), err)
}

/// Runs `cmd` with stdout/stderr captured; kills it and fails the test after `limit`.
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let Some(status) = wait_with_limit(&mut child, limit) else {
        let (o, e) = (o.join().unwrap_or_default(), e.join().unwrap_or_default());
        panic!("command still running after {limit:?}: stdout:\n{o}\nstderr:\n{e}");
    };
    Finished {
        status: status.code(),
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
        took: start.elapsed(),
    }
}

/// `cgvm run` with the given arguments, 60 s at most.
pub fn cgvm_run(args: &[&str]) -> Finished {
    let mut c = cgvm();
    c.arg("run").args(args);
    run_with_limit(c, Duration::from_secs(60))
}

/// True when /dev/kvm is the PVM module (guest ring 0 emulated), not hardware virtualization.
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The 4 KiB pattern the probe's blk check writes at `sector` (see the probe's README).
pub fn probe_pattern(sector: u64) -> Vec<u8> {
    let line = format!("cgvm-probe-blk sector {sector}\n");
    line.bytes().cycle().take(4096).collect()
}

/// The names in `dir`, sorted.
pub fn dir_listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list the directory")
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// True (after printing why the test is skipped) when passt is not on PATH.
pub fn passt_missing() -> bool {
    let found = Command::new("which")
        .arg("passt")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: passt is not installed (apt-get install passt)");
    }
    !found
}
