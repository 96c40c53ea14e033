//! The `blk` check: do the virtio-blk (DeviceID 2) disks read, write, flush, refuse what they
//! must, and say who they are?
//!
//! The disks are found on the transports `probe.transport` allows (virtio-mmio: the command
//! line and the DSDT, which must agree; virtio-pci: bus 0; see `discovery`) and named vda,
//! vdb, ... in that order (virtio-mmio in command-line order, then virtio-pci in bus order);
//! there must be at least one.
//! Each is initialized (taking RO, BLK_SIZE, FLUSH and SEG_MAX where offered), its
//! configuration read (capacity, blk_size, seg_max), and then, one request at a time on
//! queue 0 (header, data, status byte):
//! 1. GET_ID: the id (20 bytes, NUL-padded) must equal the k-th entry of `probe.blk_id` when
//!    that is given;
//! 2. a writable disk: 8 sectors of a text pattern (`cgvm-probe-blk sector N\n` repeated) are
//!    written at sector `probe.blk_sector` (default 0), flushed when FLUSH is negotiated, read
//!    back into a zeroed buffer and compared; a read-only disk (RO offered): the same write must
//!    fail with IOERR (the spec forbids a driver such a write; the probe makes it to see the
//!    device refuse it), then a read of those sectors must succeed;
//! 3. a read at sector = capacity (past the end) must fail with IOERR.
//!
//! Every request must complete with the right status and used length. The device is reset
//! afterwards. The first problem on a disk ends its part of the check.

use core::fmt::{self, Write};

use crate::checks::{self, Context, Report, Via};
use crate::discovery::Found;
use crate::text::{Escaped, Line, Size};
use crate::virtio::{
    self, config_u64, read_config, AnyTransport, DmaBuf, DmaPool, Failure, SplitQueue, Transport,
    VirtioError, DEVICE_ID_BLOCK,
};

/// Feature: seg_max is valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// Feature: the disk is read-only.
pub const F_RO: u64 = 1 << 5;
/// Feature: blk_size is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// Feature: the device takes FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// Feature: the device takes DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// Feature: the device takes WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// The features the check accepts.
const WANTED: u64 = F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH;

/// Configuration: capacity in 512-byte sectors (u64).
pub const CONFIG_CAPACITY: usize = 0x00;
/// Configuration: seg_max (u32).
pub const CONFIG_SEG_MAX: usize = 0x0c;
/// Configuration: blk_size (u32).
const CONFIG_BLK_SIZE: usize = 0x14;

/// Request type: read.
pub const T_IN: u32 = 0;
/// Request type: write.
pub const T_OUT: u32 = 1;
/// Request type: flush.
const T_FLUSH: u32 = 4;
/// Request type: get the device id.
pub const T_GET_ID: u32 = 8;

/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error.
const S_IOERR: u8 = 1;
/// Request status: unsupported.
const S_UNSUPP: u8 = 2;
/// What the status byte holds before the device writes it.
pub const S_UNWRITTEN: u8 = 0xff;

/// Sector size.
pub const SECTOR: u64 = 512;
/// Sectors written and read.
const IO_SECTORS: u64 = 8;
/// Bytes written and read.
const IO_BYTES: usize = (IO_SECTORS * SECTOR) as usize;
/// Length of a device id.
pub const ID_LEN: usize = 20;
/// Entries of queue 0 at most.
const QUEUE_LIMIT: u16 = 16;
/// How long one request may take, ms.
const TIMEOUT_MS: u64 = 2000;

/// Runs the blk check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let sector = match ctx.args.blk_sector {
        None => 0,
        Some(Ok(s)) => s,
        Some(Err(raw)) => {
            return report.fail(format_args!(
                "probe.blk_sector={}: expected a decimal sector number",
                Escaped(raw)
            ))
        }
    };
    let Some(disks) = checks::find_devices(ctx, report, DEVICE_ID_BLOCK, "virtio-blk") else {
        return;
    };
    if let Some(list) = ctx.args.blk_id {
        let ids = list.split(|&b| b == b',').count();
        if ids != disks.len() {
            report.fail(format_args!(
                "probe.blk_id={} lists {ids} ids for {} disks",
                Escaped(list),
                disks.len()
            ));
        }
    }
    for (k, d) in disks.iter().enumerate() {
        let want_id = ctx
            .args
            .blk_id
            .and_then(|list| list.split(|&b| b == b',').nth(k));
        let disk = Disk {
            name: DiskName(k),
            device: d,
        };
        let lead = (k == 0).then_some(disks.len());
        check_disk(&disk, sector, want_id, lead, report);
    }
}

/// Linux's name for the k-th virtio disk: vda..vdz, vdaa, vdab, ...
#[derive(Clone, Copy)]
pub struct DiskName(pub usize);

impl fmt::Display for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
        f.write_str("vd")?;
        if self.0 >= 26 {
            f.write_char(letter(self.0 / 26 - 1))?;
        }
        f.write_char(letter(self.0))
    }
}

/// A disk as named in problems: "vda at 0xc0001000", "vda at 00:01.0".
struct Disk<'a> {
    name: DiskName,
    device: &'a Found,
}

impl fmt::Display for Disk<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.name, self.device.at())
    }
}

/// The text written to the disk: `cgvm-probe-blk sector N\n` repeated over `out`, cut at its
/// end.
pub fn fill_pattern(sector: u64, out: &mut [u8]) {
    let mut line = Line::<48>::new();
    // Line's write_str never fails; 48 bytes hold the longest line (20 digits).
    let _ = writeln!(line, "cgvm-probe-blk sector {sector}");
    let text = line.as_str().as_bytes();
    for (i, b) in out.iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
}

/// A status byte's name.
pub struct StatusName(pub u8);

impl fmt::Display for StatusName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            S_OK => write!(f, "0 (OK)"),
            S_IOERR => write!(f, "1 (IOERR)"),
            S_UNSUPP => write!(f, "2 (UNSUPP)"),
            S_UNWRITTEN => write!(f, "0xff (not written by the device)"),
            s => write!(f, "{s}"),
        }
    }
}

/// What went wrong with one disk.
enum Problem<'a> {
    /// In the virtio machinery.
    Virtio(VirtioError),
    /// A request ended with another status.
    Status { got: u8, want: u8 },
    /// A request's used length is not what it wrote.
    UsedLen { got: u32, min: u32, max: u32 },
    /// The id is not the one `probe.blk_id` gives.
    Id { got: [u8; ID_LEN], want: &'a [u8] },
    /// The data read back differs from what was written.
    ReadBack { offset: usize, got: u8, want: u8 },
    /// The disk has no room for the 8 sectors at the sector asked for.
    TooSmall { capacity: u64, sector: u64 },
    /// SEG_MAX is offered with seg_max 0.
    SegMaxZero,
    /// BLK_SIZE is offered with a blk_size that is not a power of two from 512.
    BlkSize(u32),
}

impl fmt::Display for Problem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => write!(f, "{e}"),
            Self::Status { got, want } => write!(
                f,
                "status {}, expected {}",
                StatusName(*got),
                StatusName(*want)
            ),
            Self::UsedLen { got, min, max } if min == max => {
                write!(f, "used length {got}, expected {min}")
            }
            Self::UsedLen { got, min, max } => {
                write!(f, "used length {got}, expected {min}..={max}")
            }
            Self::Id { got, want } => write!(
                f,
                "id \"{}\", expected \"{}\" (probe.blk_id)",
                Escaped(id_text(got)),
                Escaped(want)
            ),
            Self::ReadBack { offset, got, want } => write!(
                f,
                "byte {offset} read back as 0x{got:02x}, written as 0x{want:02x}"
            ),
            Self::TooSmall { capacity, sector } => write!(
                f,
                "capacity {capacity} sectors has no room for {IO_SECTORS} sectors at sector {sector}"
            ),
            Self::SegMaxZero => write!(f, "SEG_MAX offered with seg_max 0"),
            Self::BlkSize(n) => write!(f, "blk_size {n} is not a power of two from 512"),
        }
    }
}

/// A problem at a step ("GET_ID", "write", ...).
struct StepError<'a> {
    step: &'static str,
    problem: Problem<'a>,
}

/// The id's text: up to the first NUL.
pub fn id_text(id: &[u8; ID_LEN]) -> &[u8] {
    let n = id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
    &id[..n]
}

/// The features of interest, and their names for the `ok` line (RO shows as ro/rw).
const FEATURE_NAMES: [(u64, &str); 5] = [
    (F_SEG_MAX, "seg_max"),
    (F_BLK_SIZE, "blk_size"),
    (F_FLUSH, "flush"),
    (F_DISCARD, "discard"),
    (F_WRITE_ZEROES, "write_zeroes"),
];

/// Shows the features of interest in `bits` as "seg_max,flush", or "none".
struct Features(u64);

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for (bit, name) in FEATURE_NAMES {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if any { "," } else { "" })?;
                any = true;
            }
        }
        if !any {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// What a disk turned out to be, for the `ok` line.
struct Summary {
    offered: u64,
    capacity: u64,
    blk_size: Option<u32>,
    id: [u8; ID_LEN],
    read_only: bool,
    flushed: bool,
}

/// Checks one disk and reports it: a detail on success (`lead`: the number of disks, for the
/// first one), problems otherwise.
fn check_disk(
    disk: &Disk<'_>,
    sector: u64,
    want_id: Option<&[u8]>,
    lead: Option<usize>,
    report: &mut Report,
) {
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
    let Some(t) = checks::open(disk.device, disk, report) else {
        return;
    };
    let Some(pool) = DmaPool::take() else {
        return fail_virtio(report, "setup", VirtioError::NoDma);
    };
    let result = drive(&t, &pool, sector, want_id);
    let irq = checks::close(&t, pool, disk, report);
    match result {
        Ok(s) => {
            let mut line = Line::<256>::new();
            // Line's write_fmt never fails (it truncates).
            let _ = write!(
                line,
                "{} {} {} id \"{}\" ",
                disk.name,
                Via {
                    device: disk.device,
                    irq
                },
                Size(s.capacity.saturating_mul(SECTOR)),
                Escaped(id_text(&s.id))
            );
            if let Some(n) = s.blk_size.filter(|&n| u64::from(n) != SECTOR) {
                let _ = write!(line, "blk_size {n} ");
            }
            let _ = write!(
                line,
                "{} (features {}) ",
                if s.read_only { "ro" } else { "rw" },
                Features(s.offered)
            );
            let _ = match (s.read_only, s.flushed) {
                (true, _) => write!(line, "write refused, read sector {sector}"),
                (false, true) => write!(line, "wrote+flushed+read sector {sector}"),
                (false, false) => write!(line, "wrote+read sector {sector}"),
            };
            match lead {
                Some(n) => report.detail(format_args!(
                    "{n} device{}: {line}",
                    if n == 1 { "" } else { "s" }
                )),
                None => report.detail(format_args!("{line}")),
            }
        }
        Err(StepError {
            step,
            problem: Problem::Virtio(e),
        }) => fail_virtio(report, step, e),
        Err(StepError { step, problem }) => report.fail(format_args!("{disk}: {step}: {problem}")),
    }
}

/// The buffers of one request.
struct Buffers<'a> {
    header: DmaBuf<'a>,
    status: DmaBuf<'a>,
    id: DmaBuf<'a>,
    data: DmaBuf<'a>,
}

/// The data part of a request.
#[derive(Clone, Copy)]
enum Data {
    /// None (FLUSH).
    None,
    /// The device reads this many bytes of the data buffer (OUT).
    ToDevice(usize),
    /// The device writes this many bytes of the data buffer (IN).
    FromDevice(usize),
    /// The device writes the id buffer (GET_ID).
    Id,
}

/// Sends one request and checks its status (`want`) and used length: a request that succeeds
/// must report every byte it wrote (the data it reads in, and the status byte); a failed one
/// at least the status byte. GET_ID may write fewer than 20 bytes.
fn request<'e>(
    mmio: &AnyTransport,
    queue: &mut SplitQueue<'_>,
    b: &Buffers<'_>,
    step: &'static str,
    (kind, sector, data): (u32, u64, Data),
    want: u8,
) -> Result<(), StepError<'e>> {
    let err = |problem| StepError { step, problem };
    b.header.write_u32(0, kind);
    b.header.write_u32(4, 0);
    b.header.write_u64(8, sector);
    b.status.write_u8(0, S_UNWRITTEN);
    let header = b.header.readable(16);
    let status = b.status.writable(1);
    let (used_ok, used_err) = match data {
        Data::None => ((1, 1), (1, 1)),
        Data::ToDevice(_) => ((1, 1), (1, 1)),
        Data::FromDevice(n) => ((n as u32 + 1, n as u32 + 1), (1, n as u32 + 1)),
        Data::Id => ((1, ID_LEN as u32 + 1), (1, ID_LEN as u32 + 1)),
    };
    let used = match data {
        Data::None => virtio::transact(mmio, queue, &[header, status], TIMEOUT_MS),
        Data::ToDevice(n) => virtio::transact(
            mmio,
            queue,
            &[header, b.data.readable(n), status],
            TIMEOUT_MS,
        ),
        Data::FromDevice(n) => virtio::transact(
            mmio,
            queue,
            &[header, b.data.writable(n), status],
            TIMEOUT_MS,
        ),
        Data::Id => virtio::transact(
            mmio,
            queue,
            &[header, b.id.writable(ID_LEN), status],
            TIMEOUT_MS,
        ),
    }
    .map_err(|e| err(Problem::Virtio(e)))?;
    let got = b.status.read_u8(0);
    if got != want {
        return Err(err(Problem::Status { got, want }));
    }
    let (min, max) = if got == S_OK { used_ok } else { used_err };
    if !(min..=max).contains(&used.len) {
        return Err(err(Problem::UsedLen {
            got: used.len,
            min,
            max,
        }));
    }
    Ok(())
}

/// Initializes the disk and runs the requests; what the disk turned out to be.
fn drive<'w>(
    mmio: &AnyTransport,
    pool: &DmaPool,
    sector: u64,
    want_id: Option<&'w [u8]>,
) -> Result<Summary, StepError<'w>> {
    let at = |step| move |problem| StepError { step, problem };
    let virtio_at = |step| {
        move |e| StepError {
            step,
            problem: Problem::Virtio(e),
        }
    };
    let no_dma = || StepError {
        step: "setup",
        problem: Problem::Virtio(VirtioError::NoDma),
    };

    let (features, offered, mut queue) = virtio::start_one_queue(mmio, pool, WANTED, QUEUE_LIMIT)
        .map_err(|(step, e)| virtio_at(step)(e))?;
    let b = Buffers {
        header: pool.alloc(16, 16).ok_or_else(no_dma)?,
        status: pool.alloc(1, 1).ok_or_else(no_dma)?,
        id: pool.alloc(ID_LEN, 4).ok_or_else(no_dma)?,
        data: pool.alloc(IO_BYTES, 512).ok_or_else(no_dma)?,
    };

    // Configuration.
    let capacity = config_u64(mmio, CONFIG_CAPACITY);
    let read_u32 = |offset| read_config(mmio, |t: &AnyTransport| t.config_u32(offset));
    if features & F_SEG_MAX != 0 && read_u32(CONFIG_SEG_MAX) == 0 {
        return Err(at("config")(Problem::SegMaxZero));
    }
    let blk_size = (features & F_BLK_SIZE != 0).then(|| read_u32(CONFIG_BLK_SIZE));
    if let Some(n) = blk_size.filter(|n| !n.is_power_of_two() || u64::from(*n) < SECTOR) {
        return Err(at("config")(Problem::BlkSize(n)));
    }

    // 1. GET_ID.
    request(
        mmio,
        &mut queue,
        &b,
        "GET_ID",
        (T_GET_ID, 0, Data::Id),
        S_OK,
    )?;
    let mut id = [0u8; ID_LEN];
    b.id.read_bytes(0, &mut id);
    if let Some(want) = want_id {
        if id_text(&id) != want {
            return Err(at("GET_ID")(Problem::Id { got: id, want }));
        }
    }

    // 2. Write, flush, read back; or a refused write and a read.
    if sector
        .checked_add(IO_SECTORS)
        .is_none_or(|end| end > capacity)
    {
        return Err(at("write")(Problem::TooSmall { capacity, sector }));
    }
    let read_only = features & F_RO != 0;
    let mut pattern = [0u8; IO_BYTES];
    fill_pattern(sector, &mut pattern);
    b.data.write_bytes(0, &pattern);
    let out = (T_OUT, sector, Data::ToDevice(IO_BYTES));
    let read_back = (T_IN, sector, Data::FromDevice(IO_BYTES));
    let mut flushed = false;
    if read_only {
        request(
            mmio,
            &mut queue,
            &b,
            "write to the read-only disk",
            out,
            S_IOERR,
        )
        .map_err(|e| match e.problem {
            Problem::Status { got: S_OK, .. } => StepError {
                step: "read-only disk accepted a write",
                problem: Problem::Status {
                    got: S_OK,
                    want: S_IOERR,
                },
            },
            _ => e,
        })?;
        b.data.fill(0);
        request(mmio, &mut queue, &b, "read", read_back, S_OK)?;
    } else {
        request(mmio, &mut queue, &b, "write", out, S_OK)?;
        if features & F_FLUSH != 0 {
            request(
                mmio,
                &mut queue,
                &b,
                "flush",
                (T_FLUSH, 0, Data::None),
                S_OK,
            )?;
            flushed = true;
        }
        b.data.fill(0);
        request(mmio, &mut queue, &b, "read back", read_back, S_OK)?;
        for (offset, &want) in pattern.iter().enumerate() {
            let got = b.data.read_u8(offset);
            if got != want {
                return Err(at("read back")(Problem::ReadBack { offset, got, want }));
            }
        }
    }

    // 3. Past the end.
    request(
        mmio,
        &mut queue,
        &b,
        "read past the end",
        (T_IN, capacity, Data::FromDevice(SECTOR as usize)),
        S_IOERR,
    )?;

    Ok(Summary {
        offered,
        capacity,
        blk_size,
        id,
        read_only,
        flushed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn pattern_repeats_and_is_cut() {
        let mut out = [0u8; IO_BYTES];
        fill_pattern(0, &mut out);
        let line = b"cgvm-probe-blk sector 0\n";
        assert_eq!(&out[..line.len()], line);
        assert_eq!(&out[line.len()..2 * line.len()], line);
        let full = IO_BYTES / line.len();
        let tail = IO_BYTES % line.len();
        assert_eq!(&out[full * line.len()..], &line[..tail]);

        fill_pattern(u64::MAX, &mut out);
        assert!(out.starts_with(b"cgvm-probe-blk sector 18446744073709551615\ncgvm"));
        let mut short = [0u8; 5];
        fill_pattern(7, &mut short);
        assert_eq!(&short, b"cgvm-");
    }

    #[test]
    fn feature_names() {
        assert_eq!(Features(0).to_string(), "none");
        assert_eq!(Features(F_RO | (1 << 32)).to_string(), "none");
        assert_eq!(
            Features(F_FLUSH | F_SEG_MAX | F_WRITE_ZEROES).to_string(),
            "seg_max,flush,write_zeroes"
        );
    }

    #[test]
    fn disk_names() {
        let names: std::vec::Vec<_> = [0, 1, 25, 26, 27, 51, 52]
            .iter()
            .map(|&k| DiskName(k).to_string())
            .collect();
        assert_eq!(names, ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba"]);
    }

    #[test]
    fn id_text_stops_at_nul() {
        let mut id = [0u8; ID_LEN];
        id[..4].copy_from_slice(b"data");
        assert_eq!(id_text(&id), b"data");
        let full = [b'x'; ID_LEN];
        assert_eq!(id_text(&full), &full[..]);
        assert_eq!(id_text(&[0; ID_LEN]), b"");
    }
}
