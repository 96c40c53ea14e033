//! The `blkbench` check: how fast does a virtio-blk disk serve requests, many in flight?
//!
//! It drives the first virtio-blk disk (or the one whose GET_ID is `probe.bench_id`) through
//! each workload of `probe.bench_workloads` (default: all three, in this order) for
//! `probe.bench_ms` (default 2000 ms) each:
//! - `rand-read-4k`: 4 KiB reads at random 4 KiB-aligned offsets;
//! - `rand-write-4k`: 4 KiB writes at random 4 KiB-aligned offsets (a read-only disk skips it);
//! - `seq-read-1m`: 1 MiB reads at consecutive offsets from 0, wrapping at the end.
//!
//! `probe.bench_qd` requests (default 32) are kept in flight: each has its own chain in the
//! split queue (header, data segments of at most `size_max` bytes each, status byte) and its
//! own data buffer in the large DMA arena ([`DmaPool::take_large`], 8 MiB of data). The queue
//! is polled: every used element taken is checked (head, status OK, used length) and, while
//! the time lasts, its chain goes straight back with a new offset; the avail index is
//! published once per batch and QueueNotify written only when the device asks for it
//! (avail_event with VIRTIO_F_EVENT_IDX, else the used ring's NO_NOTIFY flag). Interrupts are
//! suppressed (used_event kept out of reach, or the avail ring's NO_INTERRUPT). No port I/O
//! (the serial console) and no register access happens in the timed loop, except the
//! notification and, when nothing completes for a while, a look at the device status.
//!
//! Fewer requests are in flight when the queue or the arena cannot hold `probe.bench_qd`:
//! at most queue size / descriptors per request (a 256-entry queue: 85 of 4 KiB in 3
//! descriptors; 1 MiB in 64 KiB segments takes 18) and 8 MiB / request size (8 of 1 MiB).
//! The `qd=` of each line is what was used.
//!
//! One line per workload, for tools: `probe: blkbench NAME ops=N bytes=B ns=T qd=Q
//! notifies=K`, T the nanoseconds from the first submission to the last completion by the TSC
//! (at the rate `tsc` found), K the QueueNotify writes; or `probe: blkbench NAME skipped
//! (read-only disk)`. A request that fails
//! fails the check with its status.

use core::fmt::{self, Write};

use crate::checks::blk::{
    id_text, DiskName, StatusName, CONFIG_CAPACITY, CONFIG_SEG_MAX, F_BLK_SIZE, F_RO, F_SEG_MAX,
    ID_LEN, SECTOR, S_OK, S_UNWRITTEN, T_GET_ID, T_IN, T_OUT,
};
use crate::checks::{self, Context, Report, Via};
use crate::cmdline::Setting;
use crate::discovery::Found;
use crate::text::{Escaped, Line, Size};
use crate::tsc;
use crate::virtio::{
    self, config_u64, read_config, AnyTransport, DmaBuf, DmaPool, Failure, Segment, SplitQueue,
    Transport, VirtioError, DEVICE_ID_BLOCK, VIRTIO_F_EVENT_IDX,
};

/// Feature: size_max is valid.
const F_SIZE_MAX: u64 = 1 << 1;
/// The features the check accepts.
const WANTED: u64 = F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | VIRTIO_F_EVENT_IDX;
/// Configuration: size_max (u32).
const CONFIG_SIZE_MAX: usize = 0x08;

/// Default time per workload, ms.
const DEFAULT_MS: u64 = 2000;
/// Default queue depth.
const DEFAULT_QD: u64 = 32;
/// Largest `probe.bench_qd`.
const MAX_QD: u64 = 256;
/// Entries of queue 0 at most.
const QUEUE_LIMIT: u16 = 256;
/// Bytes of data buffers (in the large arena).
const DATA_BYTES: usize = 8 << 20;
/// How long GET_ID may take, and how long the device may go without completing anything
/// while requests are in flight, ms.
const TIMEOUT_MS: u64 = 2000;
/// Nothing completed for this long (ms): look at the device status (DEVICE_NEEDS_RESET).
const STATUS_LOOK_MS: u64 = 100;

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Its name in `probe.bench_workloads` and in the output.
    pub name: &'static str,
    /// Writes (else reads).
    pub write: bool,
    /// Bytes a request.
    pub bytes: u32,
    /// Random offsets (else consecutive).
    pub random: bool,
}

/// Every workload, in the default order.
pub const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "rand-read-4k",
        write: false,
        bytes: 4096,
        random: true,
    },
    Workload {
        name: "rand-write-4k",
        write: true,
        bytes: 4096,
        random: true,
    },
    Workload {
        name: "seq-read-1m",
        write: false,
        bytes: 1 << 20,
        random: false,
    },
];

/// The workload called `name`.
pub fn workload(name: &[u8]) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name.as_bytes() == name)
}

/// The names in a `probe.bench_workloads` list (empty items skipped).
fn workload_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|&b| b == b',').filter(|n| !n.is_empty())
}

/// The check's settings.
struct Params<'a> {
    ms: u64,
    qd: usize,
    /// `None`: all workloads.
    workloads: Option<&'a [u8]>,
    id: Option<&'a [u8]>,
}

impl<'a> Params<'a> {
    /// From the command line; problems reported, `None` then.
    fn from_args(ctx: &Context<'a>, report: &mut Report) -> Option<Self> {
        let args = ctx.args;
        let ms = match args.bench_ms {
            None => DEFAULT_MS,
            Some(Ok(ms)) if ms > 0 => ms,
            Some(Ok(_)) | Some(Err(_)) => {
                report.fail(format_args!(
                    "probe.bench_ms={}: expected a decimal number of ms from 1",
                    Raw(args.bench_ms)
                ));
                return None;
            }
        };
        let qd = match args.bench_qd {
            None => DEFAULT_QD,
            Some(Ok(qd)) if (1..=MAX_QD).contains(&qd) => qd,
            Some(Ok(_)) | Some(Err(_)) => {
                report.fail(format_args!(
                    "probe.bench_qd={}: expected a decimal queue depth 1..={MAX_QD}",
                    Raw(args.bench_qd)
                ));
                return None;
            }
        };
        if let Some(list) = args.bench_workloads {
            if workload_names(list).next().is_none() {
                report.fail(format_args!("probe.bench_workloads= names no workload"));
                return None;
            }
            if let Some(bad) = workload_names(list).find(|n| workload(n).is_none()) {
                report.fail(format_args!(
                    "probe.bench_workloads: unknown workload {} (known: {})",
                    Escaped(bad),
                    WorkloadList
                ));
                return None;
            }
        }
        Some(Self {
            ms,
            qd: qd as usize,
            workloads: args.bench_workloads,
            id: args.bench_id,
        })
    }

    /// The workloads to run, in order.
    fn workloads(&self) -> impl Iterator<Item = &'static Workload> + '_ {
        let listed = self
            .workloads
            .map(|l| workload_names(l).filter_map(workload));
        let all = self.workloads.is_none().then_some(WORKLOADS.iter());
        listed
            .into_iter()
            .flatten()
            .chain(all.into_iter().flatten())
    }
}

/// A numeric setting as given: the number, or the text that did not parse.
struct Raw<'a>(Setting<'a, u64>);

impl fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(Ok(n)) => write!(f, "{n}"),
            Some(Err(raw)) => write!(f, "{}", Escaped(raw)),
            None => Ok(()),
        }
    }
}

/// The known workloads' names, comma-separated.
struct WorkloadList;

impl fmt::Display for WorkloadList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, w) in WORKLOADS.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { ", " }, w.name)?;
        }
        Ok(())
    }
}

/// A disk as named in problems: "vda at 0xc0001000".
struct Disk<'a> {
    name: DiskName,
    device: &'a Found,
}

impl fmt::Display for Disk<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.name, self.device.at())
    }
}

/// What went wrong.
enum Problem {
    /// In the virtio machinery.
    Virtio(VirtioError),
    /// A request ended with another status than OK.
    Status { got: u8, sector: u64 },
    /// A request's used length is not what it transferred.
    UsedLen { got: u32, want: u32, sector: u64 },
    /// A used element names no request in flight.
    UsedId { id: u32 },
    /// The disk is smaller than one request.
    TooSmall { capacity: u64, bytes: u32 },
    /// A request needs more segments than seg_max allows.
    Segments { needed: u32, seg_max: u32 },
    /// The queue cannot hold one request's chain.
    QueueTooSmall { size: u16, descriptors: u32 },
    /// SEG_MAX offered with seg_max 0, or SIZE_MAX with size_max 0.
    ConfigZero(&'static str),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Virtio(e) => write!(f, "{e}"),
            Self::Status { got, sector } => write!(
                f,
                "request at sector {sector}: status {}, expected 0 (OK)",
                StatusName(got)
            ),
            Self::UsedLen { got, want, sector } => write!(
                f,
                "request at sector {sector}: used length {got}, expected {want}"
            ),
            Self::UsedId { id } => write!(f, "used element has id {id}, no request's head"),
            Self::TooSmall { capacity, bytes } => write!(
                f,
                "capacity {capacity} sectors is smaller than one request of {bytes} bytes"
            ),
            Self::Segments { needed, seg_max } => write!(
                f,
                "a request needs {needed} data segments (size_max), seg_max is {seg_max}"
            ),
            Self::QueueTooSmall { size, descriptors } => write!(
                f,
                "the queue's {size} descriptors cannot hold a request of {descriptors}"
            ),
            Self::ConfigZero(field) => write!(f, "{field} is 0"),
        }
    }
}

/// A problem at a step ("init", "GET_ID", a workload's name).
struct StepError {
    step: &'static str,
    problem: Problem,
}

fn virtio_at(step: &'static str) -> impl Fn(VirtioError) -> StepError {
    move |e| StepError {
        step,
        problem: Problem::Virtio(e),
    }
}

/// Runs the blkbench check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let Some(params) = Params::from_args(ctx, report) else {
        return;
    };
    let Some(disks) = checks::find_devices(ctx, report, DEVICE_ID_BLOCK, "virtio-blk") else {
        return;
    };
    let mut ids = Line::<256>::new();
    for (k, d) in disks.iter().enumerate() {
        let disk = Disk {
            name: DiskName(k),
            device: d,
        };
        match bench_disk(&disk, &params, report) {
            Some(Outcome::Done) => return,
            Some(Outcome::OtherId(id)) => {
                // Line's write_fmt never fails (it truncates).
                let _ = write!(
                    ids,
                    "{}{} \"{}\"",
                    if k == 0 { "" } else { ", " },
                    disk.name,
                    Escaped(id_text(&id))
                );
            }
            None => return,
        }
    }
    if let Some(want) = params.id {
        report.fail(format_args!(
            "no disk has the id \"{}\" (probe.bench_id; disks: {ids})",
            Escaped(want)
        ));
    }
}

/// How a disk's turn ended (problems are reported).
enum Outcome {
    /// Benchmarked (or failed: reported).
    Done,
    /// Not the disk `probe.bench_id` asks for: it has this id.
    OtherId([u8; ID_LEN]),
}

/// Initializes the disk and, if it is the one asked for, runs the workloads. `None`: a
/// problem, reported.
fn bench_disk(disk: &Disk<'_>, params: &Params<'_>, report: &mut Report) -> Option<Outcome> {
    let fail_virtio = |report: &mut Report, step: &str, error| {
        report.fail(format_args!(
            "{}",
            Failure {
                device: disk,
                step,
                error
            }
        ))
    };
    let t = checks::open(disk.device, disk, report)?;
    let Some(pool) = DmaPool::take_large() else {
        fail_virtio(report, "setup", VirtioError::NoDma);
        return None;
    };
    let result = drive(&t, &pool, disk, params, report);
    // On virtio-pci the MSI-X verdict rests on GET_ID (the workloads suppress interrupts);
    // a problem is reported there.
    checks::close(&t, pool, disk, report);
    match result {
        Ok(outcome) => Some(outcome),
        Err(StepError {
            step,
            problem: Problem::Virtio(e),
        }) => {
            fail_virtio(report, step, e);
            None
        }
        Err(StepError { step, problem }) => {
            report.fail(format_args!("{disk}: {step}: {problem}"));
            None
        }
    }
}

/// The disk's configuration.
struct DiskConfig {
    capacity: u64,
    /// Largest data segment (None: no limit stated).
    size_max: Option<u32>,
    /// Most data segments a request (None: no limit stated).
    seg_max: Option<u32>,
    read_only: bool,
    event_idx: bool,
}

/// Buffers of the requests: a header and a status byte each, and the data area.
struct Buffers<'a> {
    headers: DmaBuf<'a>,
    statuses: DmaBuf<'a>,
    data: DmaBuf<'a>,
}

/// Requests in flight at most (= headers and status bytes).
const MAX_SLOTS: usize = QUEUE_LIMIT as usize;

/// Initialization, GET_ID, then the workloads.
fn drive(
    mmio: &AnyTransport,
    pool: &DmaPool,
    disk: &Disk<'_>,
    params: &Params<'_>,
    report: &mut Report,
) -> Result<Outcome, StepError> {
    let no_dma = || StepError {
        step: "setup",
        problem: Problem::Virtio(VirtioError::NoDma),
    };
    let (features, _offered, mut queue) = virtio::start_one_queue(mmio, pool, WANTED, QUEUE_LIMIT)
        .map_err(|(step, e)| virtio_at(step)(e))?;
    let b = Buffers {
        headers: pool.alloc(16 * MAX_SLOTS, 16).ok_or_else(no_dma)?,
        statuses: pool.alloc(MAX_SLOTS, 1).ok_or_else(no_dma)?,
        data: pool.alloc(DATA_BYTES, 4096).ok_or_else(no_dma)?,
    };

    let read_u32 = |offset| read_config(mmio, |t: &AnyTransport| t.config_u32(offset));
    let nonzero = |field, v: u32| {
        if v == 0 {
            Err(StepError {
                step: "config",
                problem: Problem::ConfigZero(field),
            })
        } else {
            Ok(v)
        }
    };
    let config = DiskConfig {
        capacity: config_u64(mmio, CONFIG_CAPACITY),
        size_max: match features & F_SIZE_MAX != 0 {
            true => Some(nonzero("size_max", read_u32(CONFIG_SIZE_MAX))?),
            false => None,
        },
        seg_max: match features & F_SEG_MAX != 0 {
            true => Some(nonzero("seg_max", read_u32(CONFIG_SEG_MAX))?),
            false => None,
        },
        read_only: features & F_RO != 0,
        event_idx: features & VIRTIO_F_EVENT_IDX != 0,
    };

    // GET_ID, one request (descriptors 0..2, overwritten by the workloads' chains).
    let id = get_id(mmio, &mut queue, &b)?;
    if params.id.is_some_and(|want| id_text(&id) != want) {
        return Ok(Outcome::OtherId(id));
    }

    queue.suppress_interrupts(config.event_idx);
    let mut line = Line::<512>::new();
    // Line's write_fmt never fails (it truncates).
    let _ = write!(
        line,
        "{} {} {} id \"{}\" {}, {}, tsc {} kHz ({})",
        disk.name,
        Via {
            device: disk.device,
            irq: None
        },
        Size(config.capacity.saturating_mul(SECTOR)),
        Escaped(id_text(&id)),
        if config.read_only { "ro" } else { "rw" },
        if config.event_idx {
            "event_idx"
        } else {
            "no event_idx"
        },
        tsc::ticks_per_ms(),
        tsc::rate_source()
    );
    for (n, w) in params.workloads().enumerate() {
        if w.write && config.read_only {
            crate::println!("probe: blkbench {} skipped (read-only disk)", w.name);
            let _ = write!(line, "; {} skipped (read-only)", w.name);
            continue;
        }
        let r = run_workload(mmio, &mut queue, &b, &config, w, params, n as u64).map_err(
            |problem| StepError {
                step: w.name,
                problem,
            },
        )?;
        crate::println!(
            "probe: blkbench {} ops={} bytes={} ns={} qd={} notifies={}",
            w.name,
            r.ops,
            r.bytes,
            r.ns,
            r.qd,
            r.notifies
        );
        let _ = write!(line, "; {} {r}", w.name);
    }
    report.detail(format_args!("{line}"));
    Ok(Outcome::Done)
}

/// GET_ID: the disk's id (status OK required).
fn get_id(
    mmio: &AnyTransport,
    queue: &mut SplitQueue<'_>,
    b: &Buffers<'_>,
) -> Result<[u8; ID_LEN], StepError> {
    let err = |problem| StepError {
        step: "GET_ID",
        problem,
    };
    b.headers.write_u32(0, T_GET_ID);
    b.headers.write_u32(4, 0);
    b.headers.write_u64(8, 0);
    b.statuses.write_u8(0, S_UNWRITTEN);
    let header = Segment {
        addr: b.headers.addr(),
        len: 16,
        device_writes: false,
    };
    let status = b.statuses.writable(1);
    let id_buf = b.data.writable(ID_LEN);
    virtio::transact(mmio, queue, &[header, id_buf, status], TIMEOUT_MS)
        .map_err(|e| err(Problem::Virtio(e)))?;
    let got = b.statuses.read_u8(0);
    if got != S_OK {
        return Err(err(Problem::Status { got, sector: 0 }));
    }
    let mut id = [0u8; ID_LEN];
    b.data.read_bytes(0, &mut id);
    Ok(id)
}

/// What one workload did.
struct Figures {
    ops: u64,
    bytes: u64,
    ns: u64,
    qd: usize,
    /// QueueNotify writes.
    notifies: u64,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.ns.max(1);
        let iops = u128::from(self.ops) * 1_000_000_000 / u128::from(ns);
        let kib_s = u128::from(self.bytes) * 1_000_000_000 / 1024 / u128::from(ns);
        write!(
            f,
            "{iops} IOPS {}.{} MiB/s qd {}",
            kib_s / 1024,
            kib_s % 1024 * 10 / 1024,
            self.qd
        )
    }
}

/// A xorshift64 generator for the random offsets.
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is replaced: xorshift never leaves 0).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Where the requests of a workload go, in sectors.
pub struct Offsets {
    rng: Option<XorShift>,
    /// Request size in sectors.
    sectors: u64,
    /// Requests that fit in the disk (> 0).
    slots: u64,
    next: u64,
}

impl Offsets {
    /// Offsets of requests of `bytes` (a multiple of 512) on a disk of `capacity` sectors:
    /// random multiples of the request size (with `seed`), or consecutive from 0 wrapping at
    /// the end; never past the end. `None` if not one request fits.
    pub fn new(capacity: u64, bytes: u32, random: bool, seed: u64) -> Option<Self> {
        let sectors = (u64::from(bytes) / SECTOR).max(1);
        let slots = capacity / sectors;
        (slots > 0).then(|| Self {
            rng: random.then(|| XorShift::new(seed)),
            sectors,
            slots,
            next: 0,
        })
    }

    /// The next request's first sector.
    pub fn next_sector(&mut self) -> u64 {
        let slot = match &mut self.rng {
            Some(rng) => rng.next() % self.slots,
            None => {
                let s = self.next;
                self.next = if s + 1 >= self.slots { 0 } else { s + 1 };
                s
            }
        };
        slot * self.sectors
    }
}

/// How a workload's requests are laid out in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Data segments a request.
    pub segments: u32,
    /// Bytes a segment (the last may be shorter).
    pub segment_bytes: u32,
    /// Descriptors a request (header, segments, status).
    pub descriptors: u32,
    /// Requests in flight.
    pub slots: usize,
}

/// The shape of requests of `bytes` with at most `qd` in flight, in a queue of `queue_size`
/// descriptors, with `data_bytes` of buffers, segments of at most `size_max` and at most
/// `seg_max` segments a request.
fn shape(
    bytes: u32,
    qd: usize,
    queue_size: u16,
    data_bytes: usize,
    size_max: Option<u32>,
    seg_max: Option<u32>,
) -> Result<Shape, Problem> {
    let segment_bytes = size_max.map_or(bytes, |m| m.min(bytes)).max(1);
    let segments = bytes.div_ceil(segment_bytes);
    if let Some(seg_max) = seg_max.filter(|&m| segments > m) {
        return Err(Problem::Segments {
            needed: segments,
            seg_max,
        });
    }
    let descriptors = segments + 2;
    let slots = qd
        .min(usize::from(queue_size) / descriptors as usize)
        .min(data_bytes / bytes as usize)
        .min(MAX_SLOTS);
    if slots == 0 {
        return Err(Problem::QueueTooSmall {
            size: queue_size,
            descriptors,
        });
    }
    Ok(Shape {
        segments,
        segment_bytes,
        descriptors,
        slots,
    })
}

/// Runs one workload for `params.ms` with its requests in flight; what it did.
fn run_workload(
    mmio: &AnyTransport,
    queue: &mut SplitQueue<'_>,
    b: &Buffers<'_>,
    config: &DiskConfig,
    w: &Workload,
    params: &Params<'_>,
    seed: u64,
) -> Result<Figures, Problem> {
    let s = shape(
        w.bytes,
        params.qd,
        queue.size(),
        b.data.len(),
        config.size_max,
        config.seg_max,
    )?;
    let mut offsets = Offsets::new(config.capacity, w.bytes, w.random, 0x5eed_0000 + seed).ok_or(
        Problem::TooSmall {
            capacity: config.capacity,
            bytes: w.bytes,
        },
    )?;
    let kind = if w.write { T_OUT } else { T_IN };
    let want_len = if w.write { 1 } else { w.bytes + 1 };

    // The chains, once: request i uses descriptors i * descriptors.., header i, status i and
    // bytes i * size.. of the data area.
    for i in 0..s.slots {
        let head = (i as u32 * s.descriptors) as u16;
        b.headers.write_u32(16 * i, kind);
        b.headers.write_u32(16 * i + 4, 0);
        let header = Segment {
            addr: b.headers.addr() + 16 * i as u64,
            len: 16,
            device_writes: false,
        };
        queue.set_descriptor(head, header, Some(head + 1));
        let data = b.data.addr() + i as u64 * u64::from(w.bytes);
        for k in 0..s.segments {
            let at = k * s.segment_bytes;
            let seg = Segment {
                addr: data + u64::from(at),
                len: s.segment_bytes.min(w.bytes - at),
                device_writes: !w.write,
            };
            let d = head + 1 + k as u16;
            queue.set_descriptor(d, seg, Some(d + 1));
        }
        let status = Segment {
            addr: b.statuses.addr() + i as u64,
            len: 1,
            device_writes: true,
        };
        queue.set_descriptor(head + 1 + s.segments as u16, status, None);
    }
    if w.write {
        // Something other than zeros to write.
        let words = s.slots * w.bytes as usize / 8;
        for k in 0..words {
            b.data.write_u64(8 * k, 0x5a5a_5a5a_0000_0000 | k as u64);
        }
    }

    let mut sectors = [0u64; MAX_SLOTS];
    let mut pending = [false; MAX_SLOTS];
    let submit = |queue: &mut SplitQueue<'_>,
                  offsets: &mut Offsets,
                  sectors: &mut [u64; MAX_SLOTS],
                  pending: &mut [bool; MAX_SLOTS],
                  i: usize|
     -> Result<(), Problem> {
        let sector = offsets.next_sector();
        sectors[i] = sector;
        pending[i] = true;
        b.headers.write_u64(16 * i + 8, sector);
        b.statuses.write_u8(i, S_UNWRITTEN);
        queue
            .offer((i as u32 * s.descriptors) as u16)
            .map_err(Problem::Virtio)
    };

    let ticks_per_ms = tsc::ticks_per_ms();
    let duration = ticks_per_ms.saturating_mul(params.ms);
    let stall = ticks_per_ms.saturating_mul(TIMEOUT_MS);
    let look = ticks_per_ms.saturating_mul(STATUS_LOOK_MS);
    let mut ops = 0u64;
    let mut bytes = 0u64;
    // Nothing is in flight: the device's used index is where the queue has taken up to.
    let mut seen = queue.used_index();
    let start = tsc::now();
    for i in 0..s.slots {
        submit(queue, &mut offsets, &mut sectors, &mut pending, i)?;
    }
    let mut notifies = 0u64;
    if queue.publish(config.event_idx) {
        mmio.notify(queue.index());
        notifies += 1;
    }
    let mut last_progress = start;
    let mut last_look = start;
    let mut stopping = false;
    let end = loop {
        let idx = queue.used_index();
        let now = tsc::now();
        if idx == seen {
            // Nothing new: mind the clock and the device's health.
            if now.wrapping_sub(last_progress) >= look && now.wrapping_sub(last_look) >= look {
                last_look = now;
                let status = mmio.status();
                if status & virtio::STATUS_DEVICE_NEEDS_RESET != 0 {
                    return Err(Problem::Virtio(VirtioError::NeedsReset { status }));
                }
                if now.wrapping_sub(last_progress) >= stall {
                    return Err(Problem::Virtio(VirtioError::Timeout { ms: TIMEOUT_MS }));
                }
            }
            core::hint::spin_loop();
            continue;
        }
        seen = idx;
        last_progress = now;
        stopping |= now.wrapping_sub(start) >= duration;
        while let Some(used) = queue.pop_used_before(idx).map_err(Problem::Virtio)? {
            let i = (used.id / s.descriptors) as usize;
            if used.id % s.descriptors != 0 || i >= s.slots || !pending[i] {
                return Err(Problem::UsedId { id: used.id });
            }
            pending[i] = false;
            let got = b.statuses.read_u8(i);
            if got != S_OK {
                return Err(Problem::Status {
                    got,
                    sector: sectors[i],
                });
            }
            if used.len != want_len {
                return Err(Problem::UsedLen {
                    got: used.len,
                    want: want_len,
                    sector: sectors[i],
                });
            }
            ops += 1;
            bytes += u64::from(w.bytes);
            if !stopping {
                submit(queue, &mut offsets, &mut sectors, &mut pending, i)?;
            }
        }
        queue.suppress_interrupts(config.event_idx);
        if queue.publish(config.event_idx) {
            mmio.notify(queue.index());
            notifies += 1;
        }
        if stopping && queue.in_flight() == 0 {
            break tsc::now();
        }
    };
    Ok(Figures {
        ops,
        bytes,
        ns: tsc::ticks_to_ns_at(end.wrapping_sub(start), ticks_per_ms),
        qd: s.slots,
        notifies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn workloads_by_name() {
        assert_eq!(workload(b"rand-read-4k").map(|w| w.bytes), Some(4096));
        assert_eq!(workload(b"rand-write-4k").map(|w| w.write), Some(true));
        assert_eq!(workload(b"seq-read-1m").map(|w| w.random), Some(false));
        assert!(workload(b"seq-read").is_none());
        let names: Vec<&[u8]> = workload_names(b",a,,b").collect();
        assert_eq!(names, [&b"a"[..], &b"b"[..]]);
        assert_eq!(
            WorkloadList.to_string(),
            "rand-read-4k, rand-write-4k, seq-read-1m"
        );
    }

    #[test]
    fn random_offsets_are_aligned_and_inside() {
        // 1 GiB + 3 sectors: the last partial 4 KiB is never used.
        let capacity = (1u64 << 21) + 3;
        let mut o = Offsets::new(capacity, 4096, true, 1).unwrap();
        let mut distinct = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            let s = o.next_sector();
            assert_eq!(s % 8, 0);
            assert!(s + 8 <= capacity);
            distinct.insert(s);
        }
        // 10000 draws from 262144 slots: about 190 repeats expected.
        assert!(distinct.len() > 9_700, "{}", distinct.len());
        // One request fits exactly; none does.
        let mut o = Offsets::new(8, 4096, true, 7).unwrap();
        assert!((0..100).all(|_| o.next_sector() == 0));
        assert!(Offsets::new(7, 4096, true, 7).is_none());
    }

    #[test]
    fn sequential_offsets_wrap() {
        // 3.5 MiB: three 1 MiB requests fit.
        let mut o = Offsets::new(7 * 1024, 1 << 20, false, 0).unwrap();
        let got: Vec<u64> = (0..7).map(|_| o.next_sector()).collect();
        assert_eq!(got, [0, 2048, 4096, 0, 2048, 4096, 0]);
    }

    #[test]
    fn xorshift_moves() {
        let mut r = XorShift::new(0);
        let a = r.next();
        let b = r.next();
        assert!(a != 0 && b != 0 && a != b);
    }

    #[test]
    fn shapes() {
        // 4 KiB in one segment: 3 descriptors; 256 / 3 = 85.
        let s = shape(4096, 32, 256, DATA_BYTES, Some(65536), Some(254)).ok();
        assert_eq!(
            s,
            Some(Shape {
                segments: 1,
                segment_bytes: 4096,
                descriptors: 3,
                slots: 32
            })
        );
        assert_eq!(
            shape(4096, 256, 256, DATA_BYTES, None, None)
                .ok()
                .map(|s| s.slots),
            Some(85)
        );
        // 1 MiB in 64 KiB segments: 18 descriptors, 8 MiB of data: 8 in flight.
        let s = shape(1 << 20, 32, 256, DATA_BYTES, Some(65536), Some(254)).ok();
        assert_eq!(
            s,
            Some(Shape {
                segments: 16,
                segment_bytes: 65536,
                descriptors: 18,
                slots: 8
            })
        );
        // size_max not a divisor: the last segment is shorter.
        let s = shape(1 << 20, 1, 256, DATA_BYTES, Some(300_000), None).ok();
        assert_eq!(s.map(|s| (s.segments, s.descriptors)), Some((4, 6)));
        assert!(matches!(
            shape(1 << 20, 8, 256, DATA_BYTES, Some(4096), Some(128)),
            Err(Problem::Segments {
                needed: 256,
                seg_max: 128
            })
        ));
        assert!(matches!(
            shape(1 << 20, 8, 16, DATA_BYTES, Some(65536), None),
            Err(Problem::QueueTooSmall {
                size: 16,
                descriptors: 18
            })
        ));
    }

    #[test]
    fn result_line() {
        let r = Figures {
            ops: 200_000,
            bytes: 200_000 * 4096,
            ns: 2_000_000_000,
            qd: 32,
            notifies: 7,
        };
        assert_eq!(r.to_string(), "100000 IOPS 390.6 MiB/s qd 32");
    }
}
