//! virtio-blk requests (virtio 1.2, 5.2.6): parsing a descriptor chain into a [`Request`],
//! with every check a hostile guest calls for, and the [`Completion`] it gets back. No disk
//! I/O happens here; the engines execute what [`parse`] accepts.
//!
//! The chain is read as two byte streams, whatever the descriptor layout (virtio 1.x
//! message framing): the device-readable descriptors, then the device-writable ones. The
//! readable stream starts with the 16-byte header; the status byte is the last byte of the
//! writable stream. Between them is the data: readable for OUT, DISCARD and WRITE_ZEROES,
//! writable for IN and GET_ID. Zero-length descriptors contribute nothing and are skipped.
//!
//! A request that is wrong is answered IOERR (UNSUPP for an unknown type or flag). When not
//! even the status byte can be found (no device-writable byte, a chain cut short by a loop, a
//! bad next index, more than [`MAX_DESCRIPTORS`] descriptors, a status byte outside guest
//! memory), the chain is returned with used length 0 and nothing is written.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use virtio_queue::DescriptorChain;

/// Bytes in a sector: the unit of `sector` and `capacity`.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// The most data bytes one request may carry (IN, OUT): larger requests fail with IOERR.
/// A driver that honours `size_max` and `seg_max` never gets there
/// (254 segments of [`SIZE_MAX`] bytes = 15.9 MiB).
pub const MAX_REQUEST_BYTES: u32 = 16 << 20;
/// The largest data segment (the `size_max` field, VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 64 << 10;
/// The most descriptors in one chain, indirect tables included: the queue size.
pub const MAX_DESCRIPTORS: usize = super::QUEUE_SIZE as usize;
/// The most host memory segments one request may resolve to (the kernel's UIO_MAXIOV).
pub const MAX_HOST_SEGMENTS: usize = 1024;
/// The most sectors one DISCARD segment may cover (1 GiB): discarding only punches holes.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The most sectors one WRITE_ZEROES segment may cover (16 MiB, like data requests): where
/// the file system cannot zero a range, the device writes the zeros.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 15;
/// The most segments in a DISCARD or WRITE_ZEROES request (`max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEGMENTS: usize = 1;

/// Request types (virtio 1.2, 5.2.6).
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Make earlier completed writes durable.
    pub const FLUSH: u32 = 4;
    /// The device's id string.
    pub const GET_ID: u32 = 8;
    /// Discard sectors.
    pub const DISCARD: u32 = 11;
    /// Zero sectors.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type (or a flag) is not supported.
    pub const UNSUPP: u8 = 2;
}

/// The WRITE_ZEROES segment flag that lets the device deallocate.
pub const FLAG_UNMAP: u32 = 1;

const HEADER_BYTES: u64 = 16;
const SEGMENT_BYTES: u64 = 16;

/// A piece of guest memory as the host sees it: where the kernel reads or writes request
/// data (preadv, pwritev, io_uring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a HostBuf is an address range inside guest memory, which is mapped for as long as
// the device exists and is shared with the guest (and other threads) anyway; the device only
// hands it to system calls and volatile copies, never makes a Rust reference from it.
unsafe impl Send for HostBuf {}

impl HostBuf {
    /// The host address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A buffer over host memory (tests).
    #[cfg(test)]
    pub(crate) fn from_slice(s: &mut [u8]) -> Self {
        HostBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// The buffer as an iovec.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }

    /// `len` bytes from `offset` into this buffer; the caller keeps within it.
    pub(crate) fn sub(&self, offset: usize, len: usize) -> HostBuf {
        debug_assert!(offset + len <= self.len);
        HostBuf {
            ptr: self.ptr.wrapping_add(offset),
            len,
        }
    }
}

/// The bytes `start..start + len` of the stream that `bufs` form, as buffers.
pub(crate) fn sub_bufs(bufs: &[HostBuf], mut start: usize, mut len: usize) -> Vec<HostBuf> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        if start >= b.len {
            start -= b.len;
            continue;
        }
        let n = (b.len - start).min(len);
        out.push(b.sub(start, n));
        start = 0;
        len -= n;
    }
    out
}

/// Copies `src` into `bufs` (in order) as far as they go; returns the bytes copied.
pub(crate) fn copy_to_bufs(bufs: &[HostBuf], src: &[u8]) -> usize {
    let mut done = 0;
    for b in bufs {
        let n = b.len.min(src.len() - done);
        if n == 0 {
            break;
        }
        // SAFETY: `b` lies inside guest memory, which stays mapped while the device exists
        // (parse checked the whole range); the guest may touch it concurrently, hence the
        // volatile copy.
        let slice = unsafe { vm_memory::VolatileSlice::new(b.ptr, n) };
        slice.copy_from(&src[done..done + n]);
        done += n;
    }
    done
}

/// What the device knows about the disk when it checks a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in sectors.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data` from `sector`.
    In {
        /// First sector.
        sector: u64,
    },
    /// Write `data` at `sector`.
    Out {
        /// First sector.
        sector: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the id into `data`.
    GetId,
    /// Discard `sectors` sectors from `sector`.
    Discard {
        /// First sector.
        sector: u64,
        /// How many.
        sectors: u32,
    },
    /// Zero `sectors` sectors from `sector`; `unmap` allows deallocating them.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// How many.
        sectors: u32,
        /// The guest allows deallocation.
        unmap: bool,
    },
}

/// A checked request, ready to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The chain's head index (for the used ring).
    pub head: u16,
    /// What to do.
    pub kind: RequestKind,
    /// The data buffers (IN: where to read into; OUT: what to write; GET_ID: where the id
    /// goes), inside guest memory.
    pub data: Vec<HostBuf>,
    /// Their total length.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What a request counts as in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// IN.
    Read,
    /// OUT.
    Write,
    /// FLUSH.
    Flush,
    /// Anything else (GET_ID, DISCARD, WRITE_ZEROES, refused requests).
    Other,
}

/// A finished request: what goes into its status byte and the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The chain's head index.
    pub head: u16,
    /// Where the status byte goes; `None` when it could not be found.
    pub status_addr: Option<GuestAddress>,
    /// The status.
    pub status: u8,
    /// Bytes written into device-writable buffers (data and status byte).
    pub used_len: u32,
    /// For the metrics.
    pub op: Op,
    /// Data bytes moved (IN, OUT), for the metrics.
    pub bytes: u64,
}

impl Request {
    /// The offset of the request's first byte on the disk (IN, OUT).
    pub fn offset(&self) -> u64 {
        match self.kind {
            RequestKind::In { sector }
            | RequestKind::Out { sector }
            | RequestKind::Discard { sector, .. }
            | RequestKind::WriteZeroes { sector, .. } => sector * SECTOR_SIZE,
            RequestKind::Flush | RequestKind::GetId => 0,
        }
    }

    /// The bytes the rate limiter charges: the data of IN and OUT.
    pub fn rate_limited_bytes(&self) -> u64 {
        match self.kind {
            RequestKind::In { .. } | RequestKind::Out { .. } => u64::from(self.data_len),
            _ => 0,
        }
    }

    /// The completion of this request with `status`: on success the used length counts the
    /// data an IN or GET_ID wrote (at most [`ID_BYTES`] of a GET_ID), plus the status byte.
    pub fn complete(&self, status: u8) -> Completion {
        let op = match self.kind {
            RequestKind::In { .. } => Op::Read,
            RequestKind::Out { .. } => Op::Write,
            RequestKind::Flush => Op::Flush,
            _ => Op::Other,
        };
        let ok = status == status::OK;
        let written = match self.kind {
            RequestKind::In { .. } if ok => self.data_len,
            RequestKind::GetId if ok => self.data_len.min(ID_BYTES as u32),
            _ => 0,
        };
        let bytes = match self.kind {
            RequestKind::In { .. } | RequestKind::Out { .. } if ok => u64::from(self.data_len),
            _ => 0,
        };
        Completion {
            head: self.head,
            status_addr: Some(self.status),
            status,
            used_len: written + 1,
            op,
            bytes,
        }
    }
}

/// Why a chain was refused, for the debug log.
fn refuse(head: u16, status_addr: GuestAddress, status: u8, why: &str) -> Completion {
    log::debug!("virtio-blk: request {head} refused: {why}");
    Completion {
        head,
        status_addr: Some(status_addr),
        status,
        used_len: 1,
        op: Op::Other,
        bytes: 0,
    }
}

fn lost(head: u16, why: &str) -> Completion {
    log::debug!("virtio-blk: request {head} returned without a status: {why}");
    Completion {
        head,
        status_addr: None,
        status: status::IOERR,
        used_len: 0,
        op: Op::Other,
        bytes: 0,
    }
}

/// A run of guest memory from one descriptor.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// The bytes `start..start + len` of a descriptor stream.
fn sub_segments(segs: &[Segment], mut start: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if start >= s.len {
            start -= s.len;
            continue;
        }
        let n = (s.len - start).min(len);
        // Cannot overflow: the descriptor's range was checked against guest memory.
        out.push(Segment {
            addr: s.addr.unchecked_add(start),
            len: n,
        });
        start = 0;
        len -= n;
    }
    out
}

/// Host buffers for `segs`, or `None` when any byte is outside guest memory or there are
/// too many pieces.
fn host_bufs(mem: &GuestMemoryMmap, segs: &[Segment]) -> Option<Vec<HostBuf>> {
    let mut out = Vec::new();
    for s in segs {
        let len = usize::try_from(s.len).ok()?;
        let mut total = 0usize;
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, len) {
            let slice = slice.ok()?;
            total += slice.len();
            out.push(HostBuf {
                ptr: slice.ptr_guard_mut().as_ptr(),
                len: slice.len(),
            });
            if out.len() > MAX_HOST_SEGMENTS {
                return None;
            }
        }
        if total != len {
            return None;
        }
    }
    Some(out)
}

/// Reads the bytes of `segs` (a few: the header, a discard segment) into `buf`.
fn read_stream(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        let n = s.len as usize; // sub_segments bounded it by buf.len()
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Checks that `sector + bytes/512` stays within the disk.
fn in_range(sector: u64, sectors: u64, disk: &DiskInfo) -> bool {
    sector
        .checked_add(sectors)
        .is_some_and(|end| end <= disk.capacity)
}

/// Parses and checks one chain. `Err` is the answer to a request that cannot be executed
/// (with or without a status byte); the caller writes it back.
pub fn parse(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &DiskInfo,
) -> Result<Request, Completion> {
    let head = chain.head_index();
    let mut readable = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut misordered = false;
    let mut outside = false;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(lost(head, "more descriptors than the queue size"));
        }
        last_has_next = desc.has_next();
        if desc.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if !mem.check_range(seg.addr, desc.len() as usize) {
            outside = true;
        }
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                misordered = true;
            }
            readable.push(seg);
        }
    }
    if count == 0 {
        return Err(lost(
            head,
            "empty chain (bad head index or descriptor table)",
        ));
    }
    if last_has_next {
        return Err(lost(
            head,
            "the chain is cut short (a loop, a bad next index or an unreadable descriptor)",
        ));
    }
    let Some(last) = writable.last() else {
        return Err(lost(head, "no device-writable byte for the status"));
    };
    let Some(status_addr) = last.addr.checked_add(last.len - 1) else {
        return Err(lost(head, "status address overflows"));
    };
    if !mem.check_range(status_addr, 1) {
        return Err(lost(head, "status byte outside guest memory"));
    }
    let ioerr = |why: &str| refuse(head, status_addr, status::IOERR, why);
    if misordered {
        return Err(ioerr(
            "a device-readable descriptor after a device-writable one",
        ));
    }
    if outside {
        return Err(ioerr("a buffer outside guest memory"));
    }

    let readable_len = total(&readable);
    let writable_len = total(&writable) - 1;
    if readable_len < HEADER_BYTES {
        return Err(ioerr("header shorter than 16 bytes or device-writable"));
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    if !read_stream(mem, &sub_segments(&readable, 0, HEADER_BYTES), &mut header) {
        return Err(ioerr("header unreadable"));
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let req_type = le32(&header[0..4]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let in_data = sub_segments(&readable, HEADER_BYTES, readable_len - HEADER_BYTES);
    let in_len = readable_len - HEADER_BYTES;
    let out_data = sub_segments(&writable, 0, writable_len);

    let request = |kind, segs: &[Segment], len: u64| -> Result<Request, Completion> {
        let data = host_bufs(mem, segs).ok_or_else(|| {
            refuse(
                head,
                status_addr,
                status::IOERR,
                "data outside guest memory or in too many pieces",
            )
        })?;
        Ok(Request {
            head,
            kind,
            data,
            data_len: len as u32, // callers bounded it
            status: status_addr,
        })
    };
    let check_rw = |len: u64| -> Result<(), Completion> {
        if len > u64::from(MAX_REQUEST_BYTES) {
            return Err(ioerr("more data than MAX_REQUEST_BYTES"));
        }
        if len % SECTOR_SIZE != 0 {
            return Err(ioerr("data length not a multiple of 512"));
        }
        if !in_range(sector, len / SECTOR_SIZE, disk) {
            return Err(ioerr("past the end of the disk"));
        }
        Ok(())
    };

    match req_type {
        types::IN => {
            if in_len != 0 {
                return Err(ioerr("device-readable data in a read"));
            }
            check_rw(writable_len)?;
            request(RequestKind::In { sector }, &out_data, writable_len)
        }
        types::OUT => {
            if writable_len != 0 {
                return Err(ioerr("device-writable data in a write"));
            }
            if disk.read_only {
                return Err(ioerr("write to a read-only disk"));
            }
            check_rw(in_len)?;
            request(RequestKind::Out { sector }, &in_data, in_len)
        }
        types::FLUSH => request(RequestKind::Flush, &[], 0),
        types::GET_ID => {
            if in_len != 0 {
                return Err(ioerr("device-readable data in GET_ID"));
            }
            let len = writable_len.min(ID_BYTES as u64);
            request(RequestKind::GetId, &sub_segments(&out_data, 0, len), len)
        }
        types::DISCARD | types::WRITE_ZEROES => {
            let zeroes = req_type == types::WRITE_ZEROES;
            if writable_len != 0 {
                return Err(ioerr("device-writable data in a discard or write-zeroes"));
            }
            if disk.read_only {
                return Err(ioerr("discard or write-zeroes on a read-only disk"));
            }
            if in_len == 0 || in_len % SEGMENT_BYTES != 0 {
                return Err(ioerr("segments not a multiple of 16 bytes"));
            }
            if in_len / SEGMENT_BYTES > MAX_DISCARD_SEGMENTS as u64 {
                return Err(ioerr("more segments than max_discard_seg"));
            }
            let mut seg = [0u8; SEGMENT_BYTES as usize];
            if !read_stream(mem, &sub_segments(&in_data, 0, SEGMENT_BYTES), &mut seg) {
                return Err(ioerr("segment unreadable"));
            }
            let seg_sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let sectors = le32(&seg[8..12]);
            let flags = le32(&seg[12..16]);
            let known = if zeroes { FLAG_UNMAP } else { 0 };
            if flags & !known != 0 {
                return Err(refuse(
                    head,
                    status_addr,
                    status::UNSUPP,
                    "unknown segment flags",
                ));
            }
            let max = if zeroes {
                MAX_WRITE_ZEROES_SECTORS
            } else {
                MAX_DISCARD_SECTORS
            };
            if sectors > max {
                return Err(ioerr("segment larger than the maximum"));
            }
            if !in_range(seg_sector, u64::from(sectors), disk) {
                return Err(ioerr("segment past the end of the disk"));
            }
            let kind = if zeroes {
                RequestKind::WriteZeroes {
                    sector: seg_sector,
                    sectors,
                    unmap: flags & FLAG_UNMAP != 0,
                }
            } else {
                RequestKind::Discard {
                    sector: seg_sector,
                    sectors,
                }
            };
            request(kind, &[], 0)
        }
        other => Err(refuse(
            head,
            status_addr,
            status::UNSUPP,
            &format!("unknown type {other}"),
        )),
    }
}
