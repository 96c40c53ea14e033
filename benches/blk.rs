//! Block benchmark: how many virtio-blk requests the VMM serves, per engine, against what the
//! host itself gets from the same file with fio.
//!
//! ```text
//! cargo bench --bench blk -- [--seconds N] [--qd N] [--engines sync,uring]
//!                            [--transports mmio,pci] [--file PATH] [--workloads a,b]
//!                            [--vmm PATH] [--kernel PATH]
//! ```
//!
//! For each engine and virtio transport (`--transports`, default both), one run of `VMM run
//! --kernel PROBE --transport T --disk FILE,persist,engine=E --cmdline "probe.tests=blkbench
//! probe.bench_ms=... probe.bench_qd=... probe.transport=T" --cpus 2 --memory 512 --console
//! tty --timeout T`: the probe guest's `blkbench` check drives the disk for N seconds per
//! workload (4 KiB random reads, 4 KiB random writes, 1 MiB sequential reads), its requests
//! kept in flight at the queue depth, and prints `probe: blkbench NAME ops=N bytes=B ns=T
//! qd=Q` (T from the guest's TSC), then its ok line, which names the disk's transport: a run
//! whose disk was not on the transport asked for fails, as does one where the probe's time for
//! a workload is not the host's between its lines (its TSC rate, timed against the PIT, is
//! wrong when its vCPU waited for a CPU then). The table has a row per workload,
//! engine and transport, with each virtio-pci row's IOPS against virtio-mmio's. `wait4` gives the VMM process's CPU time (user + system, all
//! its threads); CPU per operation is that over the run's operations, boot included. As each
//! probe line arrives, the benchmark also reads the CPU time of the VMM's threads from
//! `/proc/PID/task/*/stat`, so that each workload gets the CPU its device thread (and io_uring
//! workers) spent per operation, apart from the vCPU threads (which the polling probe keeps
//! busy all the time).
//!
//! Then the ceiling: `fio` on the host on the same file, the same workloads and queue depths,
//! `--ioengine=io_uring --direct=0 --invalidate=0`: buffered I/O from the host page cache, as
//! the VMM does (it opens disks without O_DIRECT). The file is read once before the runs so
//! that it is in the page cache for everyone, and synced after every run so that dirty pages
//! from the write workload do not spill into the next one.
//!
//! Without `--file`, a 1 GiB file of non-zero data (not sparse: reads hit real blocks) is made
//! in a temporary directory under the target directory and removed at the end. Without
//! `--kernel`, the probe guest is built with `resources/probe-guest/build.sh` into a temporary
//! directory. Without fio on the host, the VMM's figures are printed alone. A failed run is
//! reported, and the benchmark then exits with status 1, after printing what it has.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::{env, thread};

mod common;
#[allow(dead_code)] // the block benchmark runs the VMM with it, and uses nothing else of it
#[path = "common/vmm.rs"]
mod vmm;

use common::{
    at_least_one, check_transport, check_vmm, clock_agrees, kernel_or_probe, load_average,
    names_some, parse_checked, parse_number, pick, relative, tail, vcpu_share, ClockBounds,
    Request, Result, TempDir, ThreadCpu, Transport,
};
use vmm::{describe_status, Mark, Vmm};

const USAGE: &str = "\
usage: cargo bench --bench blk -- [OPTIONS]
  --seconds N         seconds per workload (default 3, at least 1)
  --qd N              requests in flight (default 32; 1 MiB reads use at most 8)
  --engines LIST      the VMM's disk engines to measure, comma-separated (default sync,uring)
  --transports LIST   virtio transports to measure each engine on: mmio, pci, comma-separated
                      (default mmio,pci)
  --workloads LIST    rand-read-4k, rand-write-4k, seq-read-1m, comma-separated (default all)
  --file PATH         the disk image, written to (default: a 1 GiB file of non-zero data in a
                      temporary directory under the target directory, removed at the end)
  --vmm PATH          the VMM binary (default: the cgvm that cargo built for this benchmark)
  --kernel PATH       the probe guest (default: build it with resources/probe-guest/build.sh)
  --help              this text";

/// Every workload the probe knows: its name, fio's `--rw`, `--bs`, and whether it writes.
const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "rand-read-4k",
        fio_rw: "randread",
        fio_bs: "4k",
        write: false,
    },
    Workload {
        name: "rand-write-4k",
        fio_rw: "randwrite",
        fio_bs: "4k",
        write: true,
    },
    Workload {
        name: "seq-read-1m",
        fio_rw: "read",
        fio_bs: "1m",
        write: false,
    },
];
/// The probe's limit on 1 MiB requests in flight (its 8 MiB of DMA buffers).
const SEQ_MAX_QD: u32 = 8;
/// The default disk image's size.
const DEFAULT_FILE_BYTES: u64 = 1 << 30;
/// The VMM's time limit for one run is at least this, seconds.
const MIN_RUN_TIMEOUT_S: u64 = 120;
/// How many lines of a failed run's output are shown.
const TAIL_LINES: usize = 8;
/// The probe's line prefix for this check.
const PROBE_PREFIX: &str = "probe: blkbench ";
/// How far the probe's time for a workload may be from the host's between its lines (a few
/// milliseconds of setup before the first workload, and of the lines' way out).
const CLOCK_BOUNDS: ClockBounds = ClockBounds {
    over: 0.02,
    under: 0.05,
    slack_s: 0.05,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Workload {
    name: &'static str,
    fio_rw: &'static str,
    fio_bs: &'static str,
    write: bool,
}

// --- options ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    seconds: u64,
    qd: u32,
    engines: Vec<String>,
    transports: Vec<Transport>,
    workloads: Vec<&'static Workload>,
    file: Option<PathBuf>,
    vmm: PathBuf,
    kernel: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 3,
            qd: 32,
            engines: vec!["sync".to_string(), "uring".to_string()],
            transports: Transport::ALL.to_vec(),
            workloads: WORKLOADS.iter().collect(),
            file: None,
            vmm: PathBuf::from(env!("CARGO_BIN_EXE_cgvm")),
            kernel: None,
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Request<Options>> {
    let set = |opts: &mut Options, flag: &str, value: &mut dyn FnMut() -> Result<String>| {
        match flag {
            "--seconds" => opts.seconds = parse_number(flag, &value()?)?,
            "--qd" => opts.qd = parse_number(flag, &value()?)?,
            "--engines" => opts.engines = parse_list(&value()?),
            "--transports" => opts.transports = Transport::parse_list(&value()?, USAGE)?,
            "--workloads" => {
                opts.workloads = pick(&value()?, &WORKLOADS, |w| w.name, "workload", USAGE)?;
            }
            "--file" => opts.file = Some(PathBuf::from(value()?)),
            "--vmm" => opts.vmm = PathBuf::from(value()?),
            "--kernel" => opts.kernel = Some(PathBuf::from(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    parse_checked(args, USAGE, Options::default(), set, |opts| {
        at_least_one("--seconds", opts.seconds)?;
        if !(1..=256).contains(&opts.qd) {
            return Err("--qd must be 1..=256".to_string());
        }
        names_some("--engines", &opts.engines, "engine")?;
        names_some("--transports", &opts.transports, "transport")?;
        if let Some(e) = opts
            .engines
            .iter()
            .find(|e| !["sync", "uring"].contains(&e.as_str()))
        {
            return Err(format!("unknown engine {e:?} (sync or uring)"));
        }
        names_some("--workloads", &opts.workloads, "workload")
    })
}

fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// --- files --------------------------------------------------------------------------------------

/// Writes `bytes` of non-zero, non-repeating data to a new file at `path` and syncs it.
fn make_disk_image(path: &Path, bytes: u64) -> Result<()> {
    eprintln!(
        "blk bench: writing a {} MiB disk image {}",
        bytes >> 20,
        path.display()
    );
    let fail = |e: io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = File::create(path).map_err(fail)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0u64;
    while written < bytes {
        for word in chunk.chunks_exact_mut(8) {
            // xorshift64: never 0, so no 8-byte word of the image is zero.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = (bytes - written).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(fail)?;
        written += n as u64;
    }
    file.sync_all().map_err(fail)
}

/// Reads the whole file (into the host page cache); its size.
fn warm_page_cache(path: &Path) -> Result<u64> {
    let fail = |e: io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = File::open(path).map_err(fail)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
}

/// Writes the file's dirty pages back (between runs).
fn sync_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

// --- one VMM run --------------------------------------------------------------------------------

/// What the probe reported for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Measured {
    ops: u64,
    bytes: u64,
    ns: u64,
    qd: u32,
}

impl Measured {
    fn iops(&self) -> f64 {
        self.ops as f64 * 1e9 / self.ns.max(1) as f64
    }

    fn mib_s(&self) -> f64 {
        self.bytes as f64 * 1e9 / self.ns.max(1) as f64 / (1u64 << 20) as f64
    }
}

/// A workload's line from the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeLine {
    Measured(String, Measured),
    Skipped(String, String),
    Ok(String),
    Fail(String),
}

/// Parses a `probe: blkbench ...` line (`None` for any other line).
fn parse_probe_line(line: &str) -> Option<ProbeLine> {
    let rest = line.trim_end().strip_prefix(PROBE_PREFIX)?;
    if let Some(details) = rest.strip_prefix("ok ") {
        return Some(ProbeLine::Ok(details.to_string()));
    }
    if let Some(why) = rest.strip_prefix("FAIL ") {
        return Some(ProbeLine::Fail(why.to_string()));
    }
    let (name, fields) = rest.split_once(' ')?;
    if let Some(why) = fields.strip_prefix("skipped ") {
        return Some(ProbeLine::Skipped(name.to_string(), why.to_string()));
    }
    let (mut ops, mut bytes, mut ns, mut qd) = (None, None, None, None);
    for field in fields.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        match key {
            "ops" => ops = value.parse().ok(),
            "bytes" => bytes = value.parse().ok(),
            "ns" => ns = value.parse().ok(),
            "qd" => qd = value.parse().ok(),
            _ => {} // a newer probe's figure
        }
    }
    Some(ProbeLine::Measured(
        name.to_string(),
        Measured {
            ops: ops?,
            bytes: bytes?,
            ns: ns?,
            qd: qd?,
        },
    ))
}

/// What one VMM run gave.
#[derive(Debug)]
struct VmmRun {
    engine: String,
    transport: Transport,
    status: ExitStatus,
    /// User + system CPU time of the VMM process (all threads), seconds.
    cpu_s: f64,
    /// Wall-clock seconds from spawn to exit.
    wall_s: f64,
    /// The probe's lines for this check, in order.
    lines: Vec<ProbeLine>,
    /// Per measured workload: the CPU time of the VMM's threads and the host's time while it
    /// ran.
    windows: Vec<Window>,
    /// Why the run counts as failed, if it does ([`VmmRun::find_failure`]).
    failure: Option<String>,
    stdout: String,
    stderr: String,
}

impl VmmRun {
    /// The CPU time the device thread (and io_uring workers) spent per operation of
    /// `workload`, µs.
    fn device_us_per_op(&self, workload: &str) -> Option<f64> {
        let ops = self.measured(workload)?.ops;
        let cpu = self.window(workload)?.cpu?;
        (ops > 0).then(|| cpu.device_s * 1e6 / ops as f64)
    }

    fn window(&self, workload: &str) -> Option<&Window> {
        self.windows.iter().find(|w| w.workload == workload)
    }

    fn measured(&self, workload: &str) -> Option<&Measured> {
        self.lines.iter().find_map(|l| match l {
            ProbeLine::Measured(name, m) if name == workload => Some(m),
            _ => None,
        })
    }

    fn skipped(&self, workload: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            ProbeLine::Skipped(name, why) if name == workload => Some(why.as_str()),
            _ => None,
        })
    }

    fn total_ops(&self) -> u64 {
        self.lines
            .iter()
            .map(|l| match l {
                ProbeLine::Measured(_, m) => m.ops,
                _ => 0,
            })
            .sum()
    }

    /// The VMM's CPU time per operation, µs (boot included).
    fn cpu_us_per_op(&self) -> Option<f64> {
        let ops = self.total_ops();
        (ops > 0).then(|| self.cpu_s * 1e6 / ops as f64)
    }

    /// Why the run counts as failed, if it does.
    fn find_failure(&self, workloads: &[&Workload]) -> Option<String> {
        if !self.status.success() {
            return Some(describe_status(self.status));
        }
        if let Some(why) = self.lines.iter().find_map(|l| match l {
            ProbeLine::Fail(why) => Some(why),
            _ => None,
        }) {
            return Some(format!("the probe's check failed: {why}"));
        }
        if let Err(e) = check_transport(&self.stdout, "blkbench", self.transport) {
            return Some(e);
        }
        if let Some(w) = workloads
            .iter()
            .find(|w| self.measured(w.name).is_none() && self.skipped(w.name).is_none())
        {
            return Some(format!("no figures for {} in the probe's output", w.name));
        }
        for w in workloads {
            let (Some(m), Some(window)) = (self.measured(w.name), self.window(w.name)) else {
                continue;
            };
            if let Err(e) = clock_agrees(m.ns as f64 / 1e9, window.host_s, CLOCK_BOUNDS) {
                return Some(format!("{}: {e}", w.name));
            }
        }
        None
    }
}

/// The guest command line for the probe on `transport` (`None`: without `probe.transport`).
fn probe_cmdline(opts: &Options, transport: Option<Transport>) -> String {
    let names: Vec<&str> = opts.workloads.iter().map(|w| w.name).collect();
    let mut cmdline = format!(
        "probe.tests=blkbench probe.bench_ms={} probe.bench_qd={} probe.bench_workloads={}",
        opts.seconds * 1000,
        opts.qd,
        names.join(",")
    );
    if let Some(t) = transport {
        cmdline = format!("{cmdline} {}", t.probe_word());
    }
    cmdline
}

/// The arguments of `cgvm run` for one engine on one transport.
fn cgvm_args(
    opts: &Options,
    kernel: &Path,
    file: &Path,
    engine: &str,
    transport: Transport,
) -> Vec<OsString> {
    let mut disk = OsString::from(file);
    disk.push(format!(",persist,engine={engine}"));
    let timeout = (opts.seconds * opts.workloads.len() as u64 + 60).max(MIN_RUN_TIMEOUT_S);
    let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), kernel.into()];
    args.extend(transport.vmm_args());
    args.extend(["--disk".into(), disk]);
    for (flag, value) in [
        ("--cmdline", probe_cmdline(opts, Some(transport))),
        ("--cpus", "2".to_string()),
        ("--memory", "512".to_string()),
        ("--console", "tty".to_string()),
        ("--timeout", timeout.to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args
}

/// What the probe timed of a workload, and what the host saw meanwhile: from the arrival of
/// the probe's line before the workload's (`probe: started` for the first) to the arrival of
/// the workload's own.
#[derive(Debug, Clone)]
struct Window {
    workload: String,
    /// The CPU time of the VMM's threads (`None`: not read).
    cpu: Option<ThreadCpu>,
    /// Seconds.
    host_s: f64,
}

/// The [`Window`] of each measured workload, from the console's probe lines.
fn windows(marks: &[Mark]) -> Vec<Window> {
    let marks: Vec<&Mark> = marks
        .iter()
        .filter(|m| m.line.starts_with("probe: started") || m.line.starts_with(PROBE_PREFIX))
        .collect();
    marks
        .windows(2)
        .filter_map(|pair| {
            let (before, after) = (pair[0], pair[1]);
            let ProbeLine::Measured(workload, _) = parse_probe_line(&after.line)? else {
                return None;
            };
            let cpu = match (before.cpu, after.cpu) {
                (Some(a), Some(b)) => Some(b.since(&a)),
                _ => None,
            };
            let host_s = after.at.duration_since(before.at).as_secs_f64();
            Some(Window {
                workload,
                cpu,
                host_s,
            })
        })
        .collect()
}

/// Runs the VMM once with `engine` on `transport` and measures it.
fn run_vmm(
    opts: &Options,
    kernel: &Path,
    file: &Path,
    engine: &str,
    transport: Transport,
) -> Result<VmmRun> {
    eprintln!(
        "blk bench: engine {engine} on {}: booting the probe guest",
        transport.name()
    );
    let vmm = Vmm::spawn(&opts.vmm, &cgvm_args(opts, kernel, file, engine, transport))?;
    let (finished, marks) = vmm.finish_with_marks()?;
    let mut run = VmmRun {
        engine: engine.to_string(),
        transport,
        status: finished.status,
        cpu_s: finished.cpu_s,
        wall_s: finished.wall_s,
        lines: finished
            .stdout
            .lines()
            .filter_map(parse_probe_line)
            .collect(),
        windows: windows(&marks),
        failure: None,
        stdout: finished.stdout,
        stderr: finished.stderr,
    };
    run.failure = run.find_failure(&opts.workloads);
    Ok(run)
}

// --- fio ----------------------------------------------------------------------------------------

/// fio's figures for one workload.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FioResult {
    iops: f64,
    bytes_per_s: f64,
    /// User + system CPU per I/O, µs.
    cpu_us_per_op: Option<f64>,
    qd: u32,
}

/// Whether fio can be run.
fn fio_available() -> bool {
    Command::new("fio")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs fio for `w` on `file` at queue depth `qd` for `seconds`.
fn run_fio(file: &Path, w: &Workload, qd: u32, seconds: u64) -> Result<FioResult> {
    eprintln!("blk bench: fio {} qd {qd}", w.fio_rw);
    let mut filename = OsString::from("--filename=");
    filename.push(file);
    let output = Command::new("fio")
        .arg(format!("--name={}", w.name))
        .arg(filename)
        .arg(format!("--rw={}", w.fio_rw))
        .arg(format!("--bs={}", w.fio_bs))
        .arg(format!("--iodepth={qd}"))
        .args([
            "--ioengine=io_uring",
            "--direct=0",
            "--invalidate=0",
            "--norandommap",
            "--randrepeat=0",
            "--time_based",
        ])
        .arg(format!("--runtime={seconds}"))
        .arg("--output-format=json")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "fio {} failed ({}): {}",
            w.fio_rw,
            describe_status(output.status),
            tail(&stderr, TAIL_LINES).join(" / ")
        ));
    }
    parse_fio(&stdout, if w.write { "write" } else { "read" }, qd)
        .ok_or_else(|| format!("fio {}: no figures in its JSON output", w.fio_rw))
}

/// The figures of the first job's `direction` ("read" or "write") in fio's JSON output.
fn parse_fio(stdout: &str, direction: &str, qd: u32) -> Option<FioResult> {
    let root = &stdout[stdout.find('{')?..];
    let jobs = json::member(root, "jobs")?;
    let job = json::first_element(jobs)?;
    if json::number(job, "error")? != 0.0 {
        return None;
    }
    let dir = json::member(job, direction)?;
    let iops = json::number(dir, "iops")?;
    let bytes_per_s = json::number(dir, "bw_bytes")?;
    let total_ios = json::number(dir, "total_ios")?;
    let runtime_ms = json::number(dir, "runtime")?;
    let cpu_percent = json::number(job, "usr_cpu")? + json::number(job, "sys_cpu")?;
    let cpu_us_per_op =
        (total_ios > 0.0).then(|| cpu_percent / 100.0 * runtime_ms * 1000.0 / total_ios);
    Some(FioResult {
        iops,
        bytes_per_s,
        cpu_us_per_op,
        qd,
    })
}

/// Just enough JSON to read fio's output: members of objects and the first element of an
/// array, by skipping balanced values.
mod json {
    /// The text of the value of `key`, a member at the top level of the object `obj`.
    pub fn member<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
        let b = obj.as_bytes();
        let mut i = skip_ws(b, 0);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i += 1;
        loop {
            i = skip_ws(b, i);
            if b.get(i) == Some(&b'}') {
                return None;
            }
            let key_end = skip_string(b, i)?;
            let name = &obj[i + 1..key_end - 1];
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            let end = skip_value(b, start)?;
            if name == key {
                return Some(&obj[start..end]);
            }
            i = skip_ws(b, end);
            match b.get(i) {
                Some(b',') => i += 1,
                _ => return None,
            }
        }
    }

    /// The text of the first element of the array `arr`.
    pub fn first_element(arr: &str) -> Option<&str> {
        let b = arr.as_bytes();
        let i = skip_ws(b, 0);
        if b.get(i) != Some(&b'[') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        if b.get(start) == Some(&b']') {
            return None;
        }
        let end = skip_value(b, start)?;
        Some(&arr[start..end])
    }

    /// The number that is the value of `key` in the object `obj`.
    pub fn number(obj: &str, key: &str) -> Option<f64> {
        member(obj, key)?.trim().parse().ok()
    }

    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
            i += 1;
        }
        i
    }

    /// The index after the string that starts at `i`.
    fn skip_string(b: &[u8], i: usize) -> Option<usize> {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let mut j = i + 1;
        loop {
            match b.get(j)? {
                b'\\' => j += 2,
                b'"' => return Some(j + 1),
                _ => j += 1,
            }
        }
    }

    /// The index after the value that starts at `i`.
    fn skip_value(b: &[u8], i: usize) -> Option<usize> {
        match b.get(i)? {
            b'"' => skip_string(b, i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match b.get(j)? {
                        b'"' => {
                            j = skip_string(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                let mut j = i;
                while b
                    .get(j)
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    j += 1;
                }
                (j > i).then_some(j)
            }
        }
    }
}

// --- report -------------------------------------------------------------------------------------

/// The queue depth the probe used for `w` (what fio gets too): from a run's line, else what
/// the probe would use.
fn queue_depth(opts: &Options, runs: &[VmmRun], w: &Workload) -> u32 {
    runs.iter()
        .find_map(|r| r.measured(w.name).map(|m| m.qd))
        .unwrap_or(match w.name {
            "seq-read-1m" => opts.qd.min(SEQ_MAX_QD),
            _ => opts.qd,
        })
}

struct Report<'a> {
    opts: &'a Options,
    kernel: &'a Path,
    file: &'a Path,
    file_bytes: u64,
    runs: &'a [VmmRun],
    /// The host's load averages before the runs.
    load: String,
    /// Per workload: fio's figures, or why there are none.
    fio: &'a [(&'a Workload, std::result::Result<FioResult, String>)],
}

fn report(r: &Report<'_>) -> String {
    let mut out = String::new();
    let opts = r.opts;
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "cgvm block benchmark: {}, kernel {}, {cpus} host CPUs",
        opts.vmm.display(),
        r.kernel.display()
    );
    let _ = writeln!(
        out,
        "disk {} ({} MiB), {} s per workload, queue depth {} (1 MiB reads: at most {SEQ_MAX_QD}), \
         load average before: {}",
        r.file.display(),
        r.file_bytes >> 20,
        opts.seconds,
        opts.qd,
        r.load
    );
    let _ = writeln!(
        out,
        "guest command line: {:?} and probe.transport=T",
        probe_cmdline(opts, None)
    );
    let _ = writeln!(
        out,
        "{:14} {:6} {:9} {:>4} {:>11} {:>8} {:>10} {:>9} {:>16} {:>10} {:>6}",
        "workload",
        "engine",
        "transport",
        "qd",
        "IOPS",
        "vs mmio",
        "MiB/s",
        "% of fio",
        "CPU us/op",
        "dev us/op",
        "vCPU"
    );
    for w in &opts.workloads {
        let fio = r
            .fio
            .iter()
            .find(|(fw, _)| fw.name == w.name)
            .map(|(_, f)| f);
        let fio_ok = fio.and_then(|f| f.as_ref().ok());
        for run in r.runs {
            let t = run.transport.name();
            let cpu = run
                .cpu_us_per_op()
                .map_or("-".to_string(), |c| format!("{c:.2} (VMM)"));
            if run.failure.is_some() {
                let _ = writeln!(
                    out,
                    "{:14} {:6} {t:9} the run failed (below)",
                    w.name, run.engine
                );
                continue;
            }
            match (run.measured(w.name), run.skipped(w.name)) {
                (Some(m), _) => {
                    let pct = fio_ok
                        .filter(|f| f.iops > 0.0)
                        .map_or("-".to_string(), |f| {
                            format!("{:.0} %", m.iops() / f.iops * 100.0)
                        });
                    let device = run
                        .device_us_per_op(w.name)
                        .map_or("-".to_string(), |c| format!("{c:.2}"));
                    let vcpu = run
                        .window(w.name)
                        .map_or("-".to_string(), |win| vcpu_share(win.cpu, win.host_s));
                    let _ = writeln!(
                        out,
                        "{:14} {:6} {t:9} {:>4} {:>11.0} {:>8} {:>10.1} {:>9} {:>16} {:>10} \
                         {vcpu:>6}",
                        w.name,
                        run.engine,
                        m.qd,
                        m.iops(),
                        vs_mmio(r.runs, run, w),
                        m.mib_s(),
                        pct,
                        cpu,
                        device
                    );
                }
                (None, Some(why)) => {
                    let _ = writeln!(out, "{:14} {:6} {t:9} skipped {why}", w.name, run.engine);
                }
                (None, None) => {
                    let _ = writeln!(out, "{:14} {:6} {t:9} no figures", w.name, run.engine);
                }
            }
        }
        match fio {
            Some(Ok(f)) => {
                let cpu = f
                    .cpu_us_per_op
                    .map_or("-".to_string(), |c| format!("{c:.2} (fio)"));
                let _ = writeln!(
                    out,
                    "{:14} {:6} {:9} {:>4} {:>11.0} {:>8} {:>10.1} {:>9} {:>16}",
                    w.name,
                    "fio",
                    "host",
                    f.qd,
                    f.iops,
                    "",
                    f.bytes_per_s / (1u64 << 20) as f64,
                    "100 %",
                    cpu
                );
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "{:14} {:6} {e}", w.name, "fio");
            }
            None => {}
        }
    }
    let _ = writeln!(
        out,
        "vs mmio: IOPS against the same workload and engine on virtio-mmio. CPU us/op: the \
         VMM process's user + system CPU time (all threads, from wait4) over \
         all operations of its run, boot and every workload included; the vCPU thread, busy \
         all the time because the probe polls, counts too. For fio: its own CPU time."
    );
    let _ = writeln!(
        out,
        "dev us/op: the CPU time of the VMM's device thread and io_uring workers during that \
         workload (from /proc/PID/task, read every 20 ms and as the probe's lines arrive) per \
         operation. vCPU: the vCPU threads' CPU time during that workload over its wall-clock \
         time; the probe polls, so much under 100 % means its vCPU waited for a CPU (a busy \
         host) and the figures are the lower for it."
    );
    let _ = writeln!(
        out,
        "Both the VMM and fio do buffered I/O (the VMM opens disks without O_DIRECT; fio \
         --direct=0 --invalidate=0) on a file that is in the host page cache."
    );
    for run in r.runs {
        let _ = writeln!(
            out,
            "engine {} on {}: {}, {:.2} s CPU in {:.2} s wall-clock, {} operations",
            run.engine,
            run.transport.name(),
            describe_status(run.status),
            run.cpu_s,
            run.wall_s,
            run.total_ops()
        );
        for window in &run.windows {
            let mut line = format!("    {}: ", window.workload);
            if let Some(m) = run.measured(&window.workload) {
                let _ = write!(
                    line,
                    "{:.3} s by the probe's clock, {:.3} s by the host's; ",
                    m.ns as f64 / 1e9,
                    window.host_s
                );
            }
            match window.cpu {
                Some(cpu) => {
                    let _ = write!(
                        line,
                        "CPU {:.2} s vCPU threads, {:.2} s device thread + io_uring workers, \
                         {:.2} s other",
                        cpu.vcpu_s, cpu.device_s, cpu.other_s
                    );
                }
                None => line.push_str("CPU not read"),
            }
            let _ = writeln!(out, "{line}");
        }
        if let Some(ok) = run.lines.iter().find_map(|l| match l {
            ProbeLine::Ok(d) => Some(d),
            _ => None,
        }) {
            let _ = writeln!(out, "    probe: {ok}");
        }
        if let Some(why) = &run.failure {
            let _ = writeln!(out, "    FAILED: {why}");
            for line in tail(&run.stdout, TAIL_LINES) {
                let _ = writeln!(out, "    stdout: {line}");
            }
            for line in tail(&run.stderr, TAIL_LINES) {
                let _ = writeln!(out, "    stderr: {line}");
            }
        }
    }
    out
}

/// A run's IOPS for `w` against the same engine's on virtio-mmio ("-" for that one itself).
fn vs_mmio(runs: &[VmmRun], run: &VmmRun, w: &Workload) -> String {
    if run.transport == Transport::Mmio {
        return "-".to_string();
    }
    let iops = |r: &VmmRun| {
        r.measured(w.name)
            .filter(|_| r.failure.is_none())
            .map(Measured::iops)
    };
    let mmio = runs
        .iter()
        .find(|r| r.engine == run.engine && r.transport == Transport::Mmio);
    relative(iops(run), mmio.and_then(iops))
}

// --- main ---------------------------------------------------------------------------------------

fn bench(opts: &Options) -> Result<bool> {
    check_vmm(&opts.vmm)?;
    let temp = TempDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "blk-bench")?;
    let kernel = kernel_or_probe(opts.kernel.as_deref(), &temp.0, "blk bench")?;
    let file = match &opts.file {
        Some(file) => file.clone(),
        None => {
            let file = temp.0.join("disk.img");
            make_disk_image(&file, DEFAULT_FILE_BYTES)?;
            file
        }
    };
    let file_bytes = warm_page_cache(&file)?;
    let load = load_average();

    let mut runs = Vec::new();
    for engine in &opts.engines {
        for &transport in &opts.transports {
            let run = run_vmm(opts, &kernel, &file, engine, transport)?;
            sync_file(&file)?;
            runs.push(run);
        }
    }

    let mut fio = Vec::new();
    let have_fio = fio_available();
    if have_fio {
        for w in &opts.workloads {
            let qd = queue_depth(opts, &runs, w);
            let result = run_fio(&file, w, qd, opts.seconds);
            sync_file(&file)?;
            fio.push((*w, result));
        }
    }
    print!(
        "{}",
        report(&Report {
            opts,
            kernel: &kernel,
            file: &file,
            file_bytes,
            runs: &runs,
            load,
            fio: &fio,
        })
    );
    if !have_fio {
        println!(
            "fio is not installed: no host ceiling (apt-get install fio), the VMM's figures only"
        );
    }
    let runs_ok = runs.iter().all(|r| r.failure.is_none());
    let fio_ok = fio.iter().all(|(_, r)| r.is_ok());
    Ok(runs_ok && fio_ok)
}

fn main() -> ExitCode {
    let request = parse_args(env::args_os().skip(1));
    common::finish("blk bench", USAGE, request, bench)
}
