//! Boot benchmark: how fast the VMM starts a guest, how long a whole run takes and how much
//! memory the VMM process uses.
//!
//! ```text
//! cargo bench --bench boot -- [--runs N] [--transports mmio,pci] [--vmm PATH] [--kernel PATH]
//!                             [--cmdline STR] [--cpus N] [--memory MIB] [--extra-args "ARGS"]
//!                             [--verbose]
//! ```
//!
//! Each run spawns `VMM run --kernel K --transport T --rng --cmdline "C probe.transport=T"
//! --cpus N --memory M --console tty --timeout 30 --timeline [EXTRA ARGS]`, N runs on each
//! virtio transport of `--transports` (default both, taking turns run by run): virtio-pci adds a
//! PCI host bridge, its MCFG table and the probe's enumeration of the bus to find the rng
//! device. The default command line runs the probe's `boot` check (whose boot timer write is
//! "boot complete") and its `rng` check, whose line names the device's transport: a run whose
//! line is missing or names another transport than the one asked for counts as failed (a
//! `--cmdline` must keep the `rng` check). The benchmark reads CLOCK_MONOTONIC just before the
//! spawn and when `wait4` returns; the VMM prints its own CLOCK_MONOTONIC events on stderr in
//! the line `cgvm: timeline-monotonic-ns vmm-start=N first-instruction=N boot-complete=N
//! guest-stop=N` (`-` for an event that did not happen); `wait4` gives the VMM's peak RSS.
//! Figures are printed as the median and the 90th percentile (nearest rank) over the runs that
//! have them, a pair of columns per transport, and virtio-pci's median less virtio-mmio's. A
//! failed run (the VMM exited with a non-zero status, or the transport was not the one asked
//! for) is reported, and the benchmark then exits with status 1, after printing the figures.
//!
//! Without `--kernel` the probe guest is built with `resources/probe-guest/build.sh` into a
//! temporary directory.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::{env, io};

mod common;

use common::{
    at_least_one, build_probe_guest, check_transport, check_vmm, drain, joined, load_average,
    median, names_some, parse_checked, parse_number, parse_timeline, percentile, wait_for, Request,
    Result, TempDir, Timeline, Transport,
};

const USAGE: &str = "\
usage: cargo bench --bench boot -- [OPTIONS]
  --runs N            runs to measure on each transport (default 20, at least 1)
  --transports LIST   virtio transports to boot with: mmio, pci, comma-separated (default
                      mmio,pci); each run has an rng device on it, which the probe's rng check
                      must find there
  --vmm PATH          the VMM binary (default: the cgvm that cargo built for this benchmark)
  --kernel PATH       the guest kernel (default: build the probe guest with
                      resources/probe-guest/build.sh)
  --cmdline STR       the guest command line, to which probe.transport=T is added (default
                      \"probe.tests=boot,rng\"; the rng check's line shows the transport)
  --cpus N            vCPUs (default 2)
  --memory MIB        guest memory in MiB (default 256)
  --extra-args ARGS   more VMM arguments, split at white space (e.g. \"--initrd initramfs.cpio.gz\")
  --verbose           print every run's figures
  --help              this text";

/// The VMM's own time limit for one run, in seconds.
const RUN_TIMEOUT_S: u32 = 30;
/// How many lines of a failed run's stderr are shown.
const STDERR_TAIL_LINES: usize = 5;
/// The probe's check whose line shows the transport used.
const TRANSPORT_CHECK: &str = "rng";

// --- options ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    runs: usize,
    transports: Vec<Transport>,
    vmm: PathBuf,
    kernel: Option<PathBuf>,
    cmdline: String,
    cpus: u32,
    memory_mib: u64,
    extra_args: Vec<String>,
    verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 20,
            transports: Transport::ALL.to_vec(),
            vmm: PathBuf::from(env!("CARGO_BIN_EXE_cgvm")),
            kernel: None,
            cmdline: "probe.tests=boot,rng".to_string(),
            cpus: 2,
            memory_mib: 256,
            extra_args: Vec::new(),
            verbose: false,
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Request<Options>> {
    let set = |opts: &mut Options, flag: &str, value: &mut dyn FnMut() -> Result<String>| {
        match flag {
            "--runs" => opts.runs = parse_number(flag, &value()?)?,
            "--transports" => opts.transports = Transport::parse_list(&value()?, USAGE)?,
            "--vmm" => opts.vmm = PathBuf::from(value()?),
            "--kernel" => opts.kernel = Some(PathBuf::from(value()?)),
            "--cmdline" => opts.cmdline = value()?,
            "--cpus" => opts.cpus = parse_number(flag, &value()?)?,
            "--memory" => opts.memory_mib = parse_number(flag, &value()?)?,
            "--extra-args" => {
                let extra = value()?;
                opts.extra_args
                    .extend(extra.split_whitespace().map(str::to_string));
            }
            "--verbose" | "-v" => opts.verbose = true,
            _ => return Ok(false),
        }
        Ok(true)
    };
    parse_checked(args, USAGE, Options::default(), set, |opts| {
        at_least_one("--runs", opts.runs as u64)?;
        names_some("--transports", &opts.transports, "transport")
    })
}

// --- one run ------------------------------------------------------------------------------------

/// What one run of the VMM gave.
#[derive(Debug)]
struct Run {
    transport: Transport,
    status: ExitStatus,
    /// CLOCK_MONOTONIC ns just before the spawn and when wait4 returned.
    spawn_ns: u64,
    exit_ns: u64,
    /// ru_maxrss of the VMM process, KiB.
    max_rss_kib: u64,
    /// `None` when stderr had no (readable) timeline line.
    timeline: Option<Timeline>,
    /// Why the run did not show that it used its transport (from the console).
    transport_error: Option<String>,
    stderr: String,
}

impl Run {
    /// Whether the VMM exited with status 0 and the guest used the transport asked for.
    fn ok(&self) -> bool {
        self.status.success() && self.transport_error.is_none()
    }
}

/// The arguments of `cgvm run` for one boot on `transport`.
fn cgvm_args(opts: &Options, kernel: &Path, transport: Transport) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), kernel.into()];
    args.extend(transport.vmm_args());
    args.push("--rng".into());
    for (flag, value) in [
        (
            "--cmdline",
            format!("{} {}", opts.cmdline, transport.probe_word()),
        ),
        ("--cpus", opts.cpus.to_string()),
        ("--memory", opts.memory_mib.to_string()),
        ("--console", "tty".to_string()),
        ("--timeout", RUN_TIMEOUT_S.to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.push("--timeline".into());
    args.extend(opts.extra_args.iter().map(OsString::from));
    args
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of the VMM's timeline line).
fn monotonic_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which is valid and writable.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(format!("clock_gettime: {}", io::Error::last_os_error()));
    }
    let secs = u64::try_from(ts.tv_sec).map_err(|_| "clock_gettime: negative time")?;
    let nanos = u64::try_from(ts.tv_nsec).map_err(|_| "clock_gettime: negative time")?;
    Ok(secs * 1_000_000_000 + nanos)
}

/// Runs the VMM once on `transport` with `args` and measures it.
fn run_once(vmm: &Path, transport: Transport, args: &[OsString]) -> Result<Run> {
    let mut command = Command::new(vmm);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_ns = monotonic_ns()?;
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    // Drained on threads, so that a chatty VMM never blocks on a full pipe while we wait.
    let stdout = drain(child.stdout.take().ok_or("the VMM has no stdout pipe")?);
    let stderr = drain(child.stderr.take().ok_or("the VMM has no stderr pipe")?);
    let (status, usage) = wait_for(child.id())?;
    let exit_ns = monotonic_ns()?;
    let stdout = joined(stdout, "VMM's stdout")?;
    let stderr = joined(stderr, "VMM's stderr")?;
    Ok(Run {
        transport,
        status,
        spawn_ns,
        exit_ns,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        timeline: parse_timeline(&stderr),
        transport_error: check_transport(&stdout, TRANSPORT_CHECK, transport).err(),
        stderr,
    })
}

// --- figures ------------------------------------------------------------------------------------

/// Milliseconds from `from` to `to` (CLOCK_MONOTONIC ns).
fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

fn start_to_first_instruction_ms(run: &Run) -> Option<f64> {
    let first = run.timeline?.first_instruction?;
    Some(ms_between(run.spawn_ns, first))
}

fn start_to_exit_ms(run: &Run) -> Option<f64> {
    Some(ms_between(run.spawn_ns, run.exit_ns))
}

fn peak_rss_mib(run: &Run) -> Option<f64> {
    Some(run.max_rss_kib as f64 / 1024.0)
}

fn start_to_vmm_start_ms(run: &Run) -> Option<f64> {
    let vmm_start = run.timeline?.vmm_start?;
    Some(ms_between(run.spawn_ns, vmm_start))
}

fn vmm_start_to_first_instruction_ms(run: &Run) -> Option<f64> {
    let timeline = run.timeline?;
    Some(ms_between(timeline.vmm_start?, timeline.first_instruction?))
}

fn start_to_boot_complete_ms(run: &Run) -> Option<f64> {
    let complete = run.timeline?.boot_complete?;
    Some(ms_between(run.spawn_ns, complete))
}

#[derive(Clone, Copy)]
enum Unit {
    Ms,
    MiB,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Ms => format!("{value:8.2} ms"),
            Unit::MiB => format!("{value:7.1} MiB"),
        }
    }

    /// A difference, signed (no "-0.0").
    fn format_diff(self, value: f64) -> String {
        let decimals = match self {
            Unit::Ms => 100.0,
            Unit::MiB => 10.0,
        };
        let rounded = (value * decimals).round() / decimals;
        let value = if rounded == 0.0 { 0.0 } else { rounded };
        match self {
            Unit::Ms => format!("{value:+.2} ms"),
            Unit::MiB => format!("{value:+.1} MiB"),
        }
    }
}

struct Figure {
    label: &'static str,
    unit: Unit,
    of: fn(&Run) -> Option<f64>,
    /// Printed even when no run has it (as "-").
    always: bool,
}

const FIGURES: &[Figure] = &[
    Figure {
        label: "process start -> first instruction",
        unit: Unit::Ms,
        of: start_to_first_instruction_ms,
        always: true,
    },
    Figure {
        label: "process start -> exit",
        unit: Unit::Ms,
        of: start_to_exit_ms,
        always: true,
    },
    Figure {
        label: "peak RSS",
        unit: Unit::MiB,
        of: peak_rss_mib,
        always: true,
    },
    Figure {
        label: "process start -> vmm start",
        unit: Unit::Ms,
        of: start_to_vmm_start_ms,
        always: false,
    },
    Figure {
        label: "vmm start -> first instruction",
        unit: Unit::Ms,
        of: vmm_start_to_first_instruction_ms,
        always: false,
    },
    Figure {
        label: "process start -> boot complete",
        unit: Unit::Ms,
        of: start_to_boot_complete_ms,
        always: false,
    },
];

// --- statistics ---------------------------------------------------------------------------------

struct Summary {
    median: f64,
    p90: f64,
    /// How many runs had the figure.
    count: usize,
}

fn summarize(mut values: Vec<f64>) -> Option<Summary> {
    values.sort_by(f64::total_cmp);
    Some(Summary {
        median: median(&values)?,
        p90: percentile(&values, 90.0)?,
        count: values.len(),
    })
}

// --- report -------------------------------------------------------------------------------------

/// Width of the figure names' column.
const LABEL_WIDTH: usize = 36;

fn report(opts: &Options, kernel: &Path, load: &str, runs: &[Run]) -> String {
    let mut out = String::new();
    let names: Vec<&str> = opts.transports.iter().map(|t| t.name()).collect();
    let _ = writeln!(
        out,
        "cgvm boot benchmark: {} run{} on each transport ({}) of {}, kernel {}, {} vCPU{}, {} MiB, \
         an rng device",
        opts.runs,
        plural(opts.runs),
        names.join(", "),
        opts.vmm.display(),
        kernel.display(),
        opts.cpus,
        plural(opts.cpus as usize),
        opts.memory_mib
    );
    let _ = writeln!(
        out,
        "guest command line: {:?} and probe.transport=T",
        opts.cmdline
    );
    if !opts.extra_args.is_empty() {
        let _ = writeln!(out, "extra VMM arguments: {}", opts.extra_args.join(" "));
    }
    let _ = writeln!(out, "load average before: {load}");
    let both =
        opts.transports.contains(&Transport::Mmio) && opts.transports.contains(&Transport::Pci);
    let mut head = format!("{:LABEL_WIDTH$}", "");
    let mut sub = format!("{:LABEL_WIDTH$}", "");
    for t in &opts.transports {
        let _ = write!(head, " {:>23}", t.name());
        let _ = write!(sub, " {:>11} {:>11}", "median", "p90");
    }
    if both {
        let _ = write!(head, " {:>12}", "pci - mmio");
        let _ = write!(sub, " {:>12}", "median");
    }
    let _ = writeln!(out, "{}", head.trim_end());
    let _ = writeln!(out, "{}", sub.trim_end());
    for figure in FIGURES {
        let summaries: Vec<(Transport, Option<Summary>, usize)> = opts
            .transports
            .iter()
            .map(|&t| {
                let of_t: Vec<&Run> = runs.iter().filter(|r| r.transport == t).collect();
                // A run on another transport than asked for measured the other one.
                let values = of_t
                    .iter()
                    .filter(|r| r.transport_error.is_none())
                    .filter_map(|r| (figure.of)(r))
                    .collect();
                (t, summarize(values), of_t.len())
            })
            .collect();
        if !figure.always && summaries.iter().all(|(_, s, _)| s.is_none()) {
            continue;
        }
        let mut line = format!("{:LABEL_WIDTH$}", figure.label);
        let mut notes = Vec::new();
        for (t, summary, total) in &summaries {
            match summary {
                Some(s) => {
                    let _ = write!(
                        line,
                        " {} {}",
                        figure.unit.format(s.median),
                        figure.unit.format(s.p90)
                    );
                    if s.count < *total {
                        notes.push(format!("{}: {} of {total} runs", t.name(), s.count));
                    }
                }
                None => {
                    let _ = write!(line, " {:>11} {:>11}", "-", "-");
                    notes.push(format!("{}: no run had it", t.name()));
                }
            }
        }
        if both {
            let median_of = |wanted: Transport| {
                summaries
                    .iter()
                    .find(|(t, _, _)| *t == wanted)
                    .and_then(|(_, s, _)| s.as_ref())
                    .map(|s| s.median)
            };
            let diff = match (median_of(Transport::Pci), median_of(Transport::Mmio)) {
                (Some(pci), Some(mmio)) => figure.unit.format_diff(pci - mmio),
                _ => "-".to_string(),
            };
            let _ = write!(line, " {diff:>12}");
        }
        if !notes.is_empty() {
            let _ = write!(line, "  ({})", notes.join("; "));
        }
        let _ = writeln!(out, "{line}");
    }
    report_problems(&mut out, runs);
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn report_problems(out: &mut String, runs: &[Run]) {
    let failed = runs.iter().filter(|r| !r.ok()).count();
    if failed > 0 {
        let _ = writeln!(out, "failed runs: {failed} of {}", runs.len());
    }
    for (i, run) in runs.iter().enumerate() {
        if run.ok() && run.timeline.is_some() {
            continue;
        }
        let mut what = describe_status(run.status);
        if let Some(e) = &run.transport_error {
            let _ = write!(what, ", {e}");
        }
        if run.timeline.is_none() {
            what.push_str(", no timeline line on stderr (does the VMM support --timeline?)");
        }
        let _ = writeln!(out, "run {} on {}: {what}", i + 1, run.transport.name());
        for line in stderr_tail(&run.stderr) {
            let _ = writeln!(out, "    {line}");
        }
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

/// The last lines of a run's stderr, without the timeline lines.
fn stderr_tail(stderr: &str) -> Vec<&str> {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("cgvm: timeline"))
        .collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].to_vec()
}

fn print_run(i: usize, run: &Run) {
    let mut line = format!(
        "run {:3} on {}: {}",
        i + 1,
        run.transport.name(),
        describe_status(run.status)
    );
    if let Some(e) = &run.transport_error {
        let _ = write!(line, ", {e}");
    }
    for figure in FIGURES {
        if let Some(value) = (figure.of)(run) {
            let _ = write!(
                line,
                ", {} {}",
                figure.label,
                figure.unit.format(value).trim()
            );
        }
    }
    eprintln!("{line}");
}

// --- main ---------------------------------------------------------------------------------------

fn bench(opts: &Options) -> Result<bool> {
    check_vmm(&opts.vmm)?;
    let temp;
    let kernel = match &opts.kernel {
        Some(kernel) => kernel.clone(),
        None => {
            temp = TempDir::new(&env::temp_dir(), "boot-bench")?;
            build_probe_guest(&temp.0, "boot bench")?
        }
    };
    let args: Vec<(Transport, Vec<OsString>)> = opts
        .transports
        .iter()
        .map(|&t| (t, cgvm_args(opts, &kernel, t)))
        .collect();
    let load = load_average();
    let mut runs = Vec::with_capacity(opts.runs * args.len());
    // The transports take turns, so that a host busier for a while weighs on both.
    for _ in 0..opts.runs {
        for (transport, args) in &args {
            let run = run_once(&opts.vmm, *transport, args)?;
            if opts.verbose {
                print_run(runs.len(), &run);
            }
            runs.push(run);
        }
    }
    print!("{}", report(opts, &kernel, &load, &runs));
    Ok(runs.iter().all(Run::ok))
}

fn main() -> ExitCode {
    let request = parse_args(env::args_os().skip(1));
    common::finish("boot bench", USAGE, request, bench)
}
