//! Vsock benchmark: round-trip latency of small messages and throughput of 64 KiB writes over
//! the VMM's virtio-vsock device, each way, and how much of the VMM's CPU time that costs.
//!
//! ```text
//! cargo bench --bench vsock -- [--seconds N] [--scenarios a,b] [--transports mmio,pci]
//!                              [--size N] [--vmm PATH] [--kernel PATH]
//! ```
//!
//! One VMM run per scenario and virtio transport (`--transports`, default both, each scenario
//! on one after the other): `VMM run --kernel PROBE --transport mmio|pci --vsock
//! 3,uds=DIR/v.sock --cpus 1 --memory 128 --console tty --timeout T --cmdline
//! "probe.tests=vsockbench probe.vsockbench=MODE probe.vsockbench_ms=...
//! probe.transport=mmio|pci"`. The probe guest's `vsockbench` check
//! (resources/probe-guest/README.md) polls its queues with 64 KiB receive buffers, prints
//! `probe: vsockbench ready MODE`, accepts one connection on guest port 52 and prints its
//! figures when it ends, then its ok line, which names the device's transport: a run whose
//! device was not on the transport asked for fails, as does one whose guest clock (its TSC, at
//! a rate it may have timed wrong against the PIT on a busy host) disagrees with the host's
//! between the guest's ready and figures lines. The benchmark connects to the Unix socket,
//! writes `CONNECT 52\n`, reads `OK <port>\n`, then:
//!
//! - `rtt` (guest mode `echo`): writes a `--size`-byte message (default 64) and reads it back,
//!   one at a time, for N seconds; each round trip is timed (`Instant`), and p50, p99, the
//!   mean and the round trips per second are printed.
//! - `h2g` (guest mode `sink`): writes 64 KiB buffers for N seconds, then shuts its side down
//!   and waits for the guest to close. Throughput: the bytes the guest counted over its own
//!   time (TSC, first data packet to last); the host's view (bytes written over the time it
//!   wrote) is printed beside it.
//! - `g2h` (guest mode `source`): the guest sends packets of up to 64 KiB, as the device's
//!   credit allows, for N seconds; the benchmark reads with 64 KiB reads until the guest
//!   closes. Throughput: bytes read over the time from the first byte to the last.
//!
//! CPU: the VMM's threads' CPU time between the guest's ready line and its figures, from
//! `/proc/PID/task/*/stat` (10 ms ticks): the virtio-vsock device thread's (`dev`) per round
//! trip or per byte, and all threads' (`VMM`, which includes the vCPU thread that the polling
//! guest keeps busy all the time). Placement is left to the scheduler unless `--pin`: the
//! device thread then gets the last CPU, which the benchmark's client shares in `rtt` (where
//! the two take turns), while it gets the other CPUs in `h2g` and `g2h` (where they run at
//! once). On a 2-CPU machine pinning halved the throughputs and helped only rtt's p99.
//!
//! Without `--kernel`, the probe guest is built with `resources/probe-guest/build.sh` into a
//! temporary directory. A failed scenario is reported, and the benchmark then exits with
//! status 1, after printing what it has.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use std::{env, thread};

mod common;
#[path = "common/vmm.rs"]
mod vmm;

use common::{
    check_transport, check_vmm, kernel_or_probe, median, names_some, parse_checked, parse_number,
    percentile, pick, relative, Request, Result, TempDir, Transport,
};
use vmm::{field, HostState, RunLog, RunOptions, Vmm};

const USAGE: &str = "\
usage: cargo bench --bench vsock -- [OPTIONS]
  --seconds N         seconds each scenario runs (default 3, at least 1)
  --scenarios LIST    rtt, h2g, g2h, comma-separated (default all)
  --transports LIST   virtio transports to run each scenario on: mmio, pci, comma-separated
                      (default mmio,pci)
  --size N            bytes of an rtt message (default 64, 1..=4096)
  --vmm PATH          the VMM binary (default: the cgvm that cargo built for this benchmark)
  --kernel PATH       the probe guest (default: build it with resources/probe-guest/build.sh)
  --no-seccomp        run the VMM with --no-seccomp (its device threads unconfined)
  --pin               give the VMM's device thread the last CPU (see the top of
                      benches/vsock.rs; default: placement left to the scheduler)
  --help              this text";

/// The guest's CID and port.
const CID: u32 = 3;
const PORT: u32 = 52;
/// Bytes of a write (h2g) or read (g2h).
const CHUNK: usize = 64 * 1024;
/// How long a connection may take to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeouts while streaming: a guest that stops answering ends the scenario.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Rtt,
    H2g,
    G2h,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::Rtt, Scenario::H2g, Scenario::G2h];

    fn name(self) -> &'static str {
        match self {
            Self::Rtt => "rtt",
            Self::H2g => "h2g",
            Self::G2h => "g2h",
        }
    }

    /// The guest's mode.
    fn mode(self) -> &'static str {
        match self {
            Self::Rtt => "echo",
            Self::H2g => "sink",
            Self::G2h => "source",
        }
    }
}

// --- options ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    run: RunOptions,
    scenarios: Vec<&'static Scenario>,
    size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            run: RunOptions::default(),
            scenarios: Scenario::ALL.iter().collect(),
            size: 64,
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Request<Options>> {
    let set = |opts: &mut Options, flag: &str, value: &mut dyn FnMut() -> Result<String>| {
        match flag {
            "--size" => opts.size = parse_number(flag, &value()?)?,
            "--scenarios" => {
                opts.scenarios = pick(&value()?, &Scenario::ALL, |s| s.name(), "scenario", USAGE)?;
            }
            _ => return opts.run.set(flag, value, USAGE),
        }
        Ok(true)
    };
    parse_checked(args, USAGE, Options::default(), set, |opts| {
        opts.run.check()?;
        if !(1..=4096).contains(&opts.size) {
            return Err("--size must be 1..=4096".to_string());
        }
        names_some("--scenarios", &opts.scenarios, "scenario")
    })
}

// --- the host side ------------------------------------------------------------------------------

/// Connects to the guest's `PORT` through the VMM's Unix socket (`CONNECT`/`OK`).
fn connect(uds: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let stream = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot connect to {}: {e}", uds.display())),
        }
    };
    let fail = |e: io::Error| format!("vsock handshake: {e}");
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(fail)?;
    (&stream)
        .write_all(format!("CONNECT {PORT}\n").as_bytes())
        .map_err(fail)?;
    // Byte by byte: nothing after the line may be taken from the stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if (&stream).read(&mut byte).map_err(fail)? == 0 {
            return Err("vsock handshake: the VMM closed the connection (refused?)".into());
        }
        line.push(byte[0]);
        if line.len() > 64 {
            return Err("vsock handshake: no line from the VMM".into());
        }
    }
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("OK ") {
        return Err(format!("vsock handshake: {:?}", text.trim_end()));
    }
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
    Ok(stream)
}

/// What the host side measured.
#[derive(Debug, Default, Clone)]
struct Host {
    /// rtt: each round trip, µs.
    rtts_us: Vec<f64>,
    /// Bytes written and read.
    written: u64,
    read: u64,
    /// Seconds of writing (h2g) or from the first byte read to the last (g2h, rtt: the loop).
    seconds: f64,
}

/// Reads until the peer closes (or the timeout); how many bytes.
fn drain_until_closed(stream: &mut UnixStream) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// rtt: one message at a time for `seconds`.
fn ping_pong(stream: &mut UnixStream, size: usize, seconds: u64) -> io::Result<Host> {
    let message: Vec<u8> = (0..size).map(|i| (i as u8) ^ 0xa5).collect();
    let mut back = vec![0u8; size];
    let mut host = Host::default();
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    while Instant::now() < until {
        let t = Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut back)?;
        host.rtts_us.push(t.elapsed().as_secs_f64() * 1e6);
        if back != message {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the echo differs from the message",
            ));
        }
        host.written += size as u64;
        host.read += size as u64;
    }
    host.seconds = start.elapsed().as_secs_f64();
    stream.shutdown(Shutdown::Write)?;
    host.read += drain_until_closed(stream)?;
    Ok(host)
}

/// h2g: 64 KiB writes for `seconds`, then the end of the stream.
fn push(stream: &mut UnixStream, seconds: u64) -> io::Result<Host> {
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i as u8).wrapping_mul(13)).collect();
    let mut host = Host::default();
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    while Instant::now() < until {
        stream.write_all(&buf)?;
        host.written += CHUNK as u64;
    }
    host.seconds = start.elapsed().as_secs_f64();
    stream.shutdown(Shutdown::Write)?;
    host.read = drain_until_closed(stream)?;
    Ok(host)
}

/// g2h: 64 KiB reads until the guest closes.
fn pull(stream: &mut UnixStream) -> io::Result<Host> {
    let mut buf = vec![0u8; CHUNK];
    let mut host = Host::default();
    let mut first = None;
    let mut last = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                host.read += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    host.seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(host)
}

// --- runs ---------------------------------------------------------------------------------------

/// The guest's figures (its result line).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Guest {
    rx_bytes: u64,
    rx_packets: u64,
    tx_bytes: u64,
    tx_packets: u64,
    ns: u64,
    credit_updates: u64,
}

impl Guest {
    fn parse(line: &str) -> Option<Self> {
        Some(Self {
            rx_bytes: field(line, "rx_bytes")?,
            rx_packets: field(line, "rx_packets")?,
            tx_bytes: field(line, "tx_bytes")?,
            tx_packets: field(line, "tx_packets")?,
            ns: field(line, "ns")?,
            credit_updates: field(line, "credit_updates")?,
        })
    }
}

/// One scenario's run on one transport.
struct Run {
    scenario: Scenario,
    transport: Transport,
    guest: Option<Guest>,
    host: Option<Host>,
    log: RunLog,
}

/// What every run needs.
struct Setup<'a> {
    opts: &'a Options,
    kernel: &'a Path,
    dir: &'a Path,
    host: HostState,
}

fn run_scenario(setup: &Setup<'_>, scenario: Scenario, transport: Transport) -> Run {
    let mut run = Run {
        scenario,
        transport,
        guest: None,
        host: None,
        log: RunLog::default(),
    };
    if let Err(e) = drive(setup, &mut run) {
        run.log.failure = Some(e);
    }
    run
}

fn drive(setup: &Setup<'_>, run: &mut Run) -> Result<()> {
    let (opts, sc) = (setup.opts, run.scenario);
    let t = run.transport.name();
    eprintln!("vsock bench: {} on {t}", sc.name());
    let uds = setup.dir.join(format!("{}-{t}.sock", sc.name()));
    let mut vsock = OsString::from(format!("{CID},uds="));
    vsock.push(&uds);
    let cmdline = format!(
        "probe.tests=vsockbench probe.vsockbench={} probe.vsockbench_port={PORT} \
         probe.vsockbench_ms={}",
        sc.mode(),
        opts.run.seconds * 1000
    );
    let args = opts.run.run_args(
        setup.kernel,
        run.transport,
        ["--vsock".into(), vsock],
        &cmdline,
    );
    let vmm = Vmm::spawn(&opts.run.vmm, &args)?;
    let talked = (|| -> Result<()> {
        let ready = vmm.wait_ready(
            "probe: vsockbench ready",
            &mut run.log,
            setup.host.pinning.as_ref(),
        )?;
        let pinning = setup.host.pinning.clone();
        let (seconds, size) = (opts.run.seconds, opts.size);
        let client = thread::spawn(move || -> Result<Host> {
            if let Some(p) = pinning {
                // rtt: the client and the device thread take turns, so they share a CPU;
                // otherwise they run at once, and the client goes beside the vCPU.
                let _ = match sc {
                    Scenario::Rtt => p.apply_here_device(),
                    Scenario::H2g | Scenario::G2h => p.apply_here(),
                };
            }
            let mut stream = connect(&uds)?;
            let fail = |e: io::Error| format!("{}: {e}", sc.name());
            match sc {
                Scenario::Rtt => ping_pong(&mut stream, size, seconds).map_err(fail),
                Scenario::H2g => push(&mut stream, seconds).map_err(fail),
                Scenario::G2h => pull(&mut stream).map_err(fail),
            }
        });
        let prefix = format!("probe: vsockbench {} ", sc.mode());
        let result = vmm.wait_figures(&prefix, opts.run.seconds);
        let host = client
            .join()
            .map_err(|_| "the client thread panicked".to_string())?;
        let result = result?;
        run.host = Some(host?);
        run.guest = Some(run.log.figures(&ready, &result, Guest::parse)?);
        Ok(())
    })();
    vmm.conclude(talked, &mut run.log)?;
    check_transport(&run.log.stdout, "vsockbench", run.transport)?;
    run.guest.map_or(Ok(()), |g| run.log.check_clock(g.ns))
}

// --- report -------------------------------------------------------------------------------------

fn report(setup: &Setup<'_>, runs: &[Run]) -> String {
    let opts = setup.opts;
    let mut out = String::new();
    opts.run.write_title(&mut out, "vsock", setup.kernel);
    let _ = writeln!(
        out,
        "guest CID {CID} port {PORT}, 1 vCPU, {} s per scenario, {}",
        opts.run.seconds, setup.host
    );
    let cpu_per = |run: &Run, n: f64, scale: f64| -> (String, String) {
        match run.log.cpu {
            Some(c) if n > 0.0 => (
                format!("{:.3}", c.device_s * scale / n),
                format!("{:.3}", c.total_s() * scale / n),
            ),
            _ => ("-".to_string(), "-".to_string()),
        }
    };
    let rtts: Vec<&Run> = runs
        .iter()
        .filter(|r| r.scenario == Scenario::Rtt)
        .collect();
    if !rtts.is_empty() {
        let _ = writeln!(
            out,
            "{:8} {:9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6}",
            "scenario",
            "transport",
            "round trips",
            "rt/s",
            "vs mmio",
            "p50 us",
            "p99 us",
            "mean us",
            "max us",
            "dev us/rt",
            "VMM us/rt",
            "vCPU"
        );
    }
    for run in rtts {
        let t = run.transport.name();
        let (Some(h), Some(per_s)) = (run.host.as_ref(), rate(run)) else {
            let _ = writeln!(
                out,
                "{:8} {t:9} the run failed (below)",
                run.scenario.name()
            );
            continue;
        };
        let mut sorted = h.rtts_us.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n.max(1) as f64;
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let (dev, all) = cpu_per(run, n as f64, 1e6);
        let _ = writeln!(
            out,
            "{:8} {t:9} {n:>11} {:>8.0} {:>8} {:>8} {:>8} {mean:>8.1} {:>8} {dev:>10} {all:>10} \
             {:>6}",
            run.scenario.name(),
            per_s,
            vs_mmio(runs, run),
            show(median(&sorted)),
            show(percentile(&sorted, 99.0)),
            show(sorted.last().copied()),
            run.log.vcpu_share(),
        );
    }
    let streams: Vec<&Run> = runs
        .iter()
        .filter(|r| r.scenario != Scenario::Rtt)
        .collect();
    if !streams.is_empty() {
        let _ = writeln!(
            out,
            "{:8} {:9} {:>11} {:>8} {:>11} {:>11} {:>12} {:>12} {:>6}",
            "scenario",
            "transport",
            "Gbit/s",
            "vs mmio",
            "guest MiB/s",
            "host MiB/s",
            "dev ns/byte",
            "VMM ns/byte",
            "vCPU"
        );
    }
    for run in streams {
        let (sc, t) = (run.scenario, run.transport.name());
        let (Some(g), Some(h), Some(gbit_s)) = (run.guest, run.host.as_ref(), rate(run)) else {
            let _ = writeln!(out, "{:8} {t:9} the run failed (below)", sc.name());
            continue;
        };
        let mib_s = |bytes: u64, s: f64| bytes as f64 / s.max(1e-9) / (1 << 20) as f64;
        let guest_s = g.ns as f64 / 1e9;
        let (guest, host, bytes) = match sc {
            Scenario::H2g => (
                mib_s(g.rx_bytes, guest_s),
                mib_s(h.written, h.seconds),
                g.rx_bytes,
            ),
            _ => (mib_s(g.tx_bytes, guest_s), mib_s(h.read, h.seconds), h.read),
        };
        let (dev, all) = cpu_per(run, bytes as f64, 1e9);
        let _ = writeln!(
            out,
            "{:8} {t:9} {:>11.3} {:>8} {guest:>11.0} {host:>11.0} {dev:>12} {all:>12} {:>6}",
            sc.name(),
            gbit_s,
            vs_mmio(runs, run),
            run.log.vcpu_share(),
        );
    }
    let _ = writeln!(
        out,
        "rtt: {}-byte messages written and read back one at a time, each round trip timed by the \
         host. h2g: 64 KiB writes, Gbit/s by the guest's count over its own time (TSC, first \
         data packet to last). g2h: the guest's packets of up to 64 KiB, Gbit/s read by the host \
         from its first byte to its last. guest/host MiB/s: each side's view. vs mmio: round \
         trips per second or Gbit/s against the same scenario on virtio-mmio. vCPU: the vCPU \
         thread's CPU time from the guest's ready line to its figures over that time (much \
         under 100 %: it waited for a CPU, a busy host).",
        opts.size
    );
    let _ = writeln!(
        out,
        "dev: the CPU time of the VMM's virtio-vsock thread, VMM: of all its threads (the vCPU \
         thread polls all the time), from the guest's ready line to its figures \
         (/proc/PID/task/*/stat, 10 ms ticks), over the round trips or bytes."
    );
    for run in runs {
        let _ = writeln!(out, "{} on {}:", run.scenario.name(), run.transport.name());
        if let Some(ready) = &run.log.ready {
            let _ = writeln!(out, "    {ready}");
        }
        if let Some(g) = run.guest {
            let _ = writeln!(
                out,
                "    guest: received {} bytes in {} packets, sent {} bytes in {} packets, {} \
                 credit updates, {:.3} s from the first data packet to the last",
                g.rx_bytes,
                g.rx_packets,
                g.tx_bytes,
                g.tx_packets,
                g.credit_updates,
                g.ns as f64 / 1e9
            );
        }
        if let Some(h) = &run.host {
            let _ = writeln!(
                out,
                "    host: wrote {} bytes, read {} bytes",
                h.written, h.read
            );
        }
        if let Some(c) = run.log.cpu {
            let _ = writeln!(
                out,
                "    VMM CPU in that window: {:.2} s device thread, {:.2} s vCPU, {:.2} s other",
                c.device_s, c.vcpu_s, c.other_s
            );
        }
        run.log.write_end(&mut out);
    }
    out
}

/// A run's main figure: round trips per second (rtt), else Gbit/s (h2g: the guest's count,
/// g2h: what the host read); `None` for a failed run.
fn rate(run: &Run) -> Option<f64> {
    if run.log.failure.is_some() {
        return None;
    }
    let (g, h) = (run.guest?, run.host.as_ref()?);
    Some(match run.scenario {
        Scenario::Rtt => h.rtts_us.len() as f64 / h.seconds.max(1e-9),
        Scenario::H2g => g.rx_bytes as f64 * 8.0 / g.ns.max(1) as f64,
        Scenario::G2h => h.read as f64 * 8.0 / h.seconds.max(1e-9) / 1e9,
    })
}

/// A run's [`rate`] against the same scenario's on virtio-mmio ("-" for that one itself).
fn vs_mmio(runs: &[Run], run: &Run) -> String {
    if run.transport == Transport::Mmio {
        return "-".to_string();
    }
    let mmio = runs
        .iter()
        .find(|r| r.scenario == run.scenario && r.transport == Transport::Mmio);
    relative(rate(run), mmio.and_then(rate))
}

// --- main ---------------------------------------------------------------------------------------

fn bench(opts: &Options) -> Result<bool> {
    check_vmm(&opts.run.vmm)?;
    let temp = TempDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "vsock-bench")?;
    let kernel = kernel_or_probe(opts.run.kernel.as_deref(), &temp.0, "vsock bench")?;
    let setup = Setup {
        opts,
        kernel: &kernel,
        dir: &temp.0,
        host: HostState::now(opts.run.pin),
    };
    let runs: Vec<Run> = opts
        .scenarios
        .iter()
        .flat_map(|&&sc| opts.run.transports.iter().map(move |&t| (sc, t)))
        .map(|(sc, t)| run_scenario(&setup, sc, t))
        .collect();
    print!("{}", report(&setup, &runs));
    Ok(runs.iter().all(|r| r.log.failure.is_none()))
}

fn main() -> ExitCode {
    let request = parse_args(env::args_os().skip(1));
    common::finish("vsock bench", USAGE, request, bench)
}
