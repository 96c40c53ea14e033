//! The io_uring engine: one ring of [`ENTRIES`] per disk, created with the device (before any
//! guest runs, so the device thread only ever calls io_uring_enter), and an eventfd
//! registered with it that the device thread waits on for completions.
//!
//! IN and OUT become READV and WRITEV straight into guest memory, FLUSH an FSYNC with
//! DATASYNC; a request keeps its slot (head index, status address, iovecs) until its
//! completion arrives, and a short transfer is resubmitted for the rest. Guest memory stays
//! mapped for as long as the device exists, and a stopping device thread waits for every
//! request in flight ([`UringEngine::drain`]) before it lets the device be reset, so the
//! kernel never writes into memory the device no longer owns. Completions are tagged with a
//! generation that changes at each drain, so one from before a reset is never taken for a
//! request of the next activation.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sync;
use crate::virtio::block::disk::Disk;
use crate::virtio::block::request::{status, Completion, Request, RequestKind, ID_BYTES};

/// Submission queue entries per disk: the most requests in flight at once.
pub(crate) const ENTRIES: u32 = 128;

/// What the io_uring engine calls on the device thread: the sync engine's list (GET_ID,
/// DISCARD and WRITE_ZEROES run synchronously) and io_uring_enter.
pub(crate) const SYSCALLS: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    // Arming the limiter's timer, and disarming it when an update retries a held request.
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_io_uring_enter,
];

/// The most iovecs one READV/WRITEV takes.
const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// The iovecs of a request in flight.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs point into guest memory (see HostBuf); only the kernel and the device
// thread that owns the engine use them.
unsafe impl Send for Iovecs {}

/// A request the kernel is working on.
struct InFlight {
    req: Request,
    kind: Kind,
    fd: RawFd,
    iov: Iovecs,
    first: usize,
    offset: u64,
    remaining: u64,
}

/// A disk's io_uring.
pub(crate) struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    generation: u32,
}

impl UringEngine {
    /// A ring with an eventfd for completions.
    pub(crate) fn new() -> io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            slots: (0..ENTRIES).map(|_| None).collect(),
            free: (0..ENTRIES as usize).rev().collect(),
            generation: 0,
        })
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether a slot is free.
    pub(crate) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// The eventfd the kernel writes when requests complete.
    pub(crate) fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Starts `req`. GET_ID, DISCARD, WRITE_ZEROES and a FLUSH with nothing to sync finish at
    /// once; so does a request that cannot be queued (executed synchronously instead).
    pub(crate) fn submit(
        &mut self,
        req: Request,
        disk: &mut Disk,
        serial: &[u8; ID_BYTES],
    ) -> Option<Completion> {
        let Some((fd, durable)) = disk.raw() else {
            return Some(sync::execute(&req, disk, serial));
        };
        let kind = match req.kind {
            RequestKind::In { .. } if req.data_len > 0 => Kind::Read,
            RequestKind::Out { .. } if req.data_len > 0 => Kind::Write,
            RequestKind::In { .. } | RequestKind::Out { .. } => {
                return Some(req.complete(status::OK))
            }
            RequestKind::Flush if durable => Kind::Flush,
            RequestKind::Flush => return Some(req.complete(status::OK)),
            _ => return Some(sync::execute(&req, disk, serial)),
        };
        let Some(slot) = self.free.pop() else {
            return Some(sync::execute(&req, disk, serial));
        };
        let iov = Iovecs(req.data.iter().map(|b| b.iovec()).collect());
        let offset = req.offset();
        let remaining = u64::from(req.data_len);
        self.slots[slot] = Some(InFlight {
            req,
            kind,
            fd,
            iov,
            first: 0,
            offset,
            remaining,
        });
        if self.push(slot) {
            return None;
        }
        // The submission queue is full (it never is: it has a place per slot).
        let f = self.slots[slot].take()?;
        self.free.push(slot);
        Some(sync::execute(&f.req, disk, serial))
    }

    /// Queues the operation of `slot`; false when the submission queue is full.
    fn push(&mut self, slot: usize) -> bool {
        let Some(f) = &self.slots[slot] else {
            return false;
        };
        let user_data = (u64::from(self.generation) << 32) | slot as u64;
        let fd = types::Fd(f.fd);
        let iov = &f.iov.0[f.first..];
        let n = iov.len().min(IOV_MAX) as u32;
        let entry = match f.kind {
            Kind::Read => opcode::Readv::new(fd, iov.as_ptr(), n)
                .offset(f.offset)
                .build(),
            Kind::Write => opcode::Writev::new(fd, iov.as_ptr(), n)
                .offset(f.offset)
                .build(),
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(user_data);
        // SAFETY: the iovec array lives in the slot (a heap buffer that does not move) until
        // the completion arrives; the buffers it points to are guest memory, mapped for as
        // long as the device exists, and the device thread drains the ring before it gives
        // the device up; the descriptor belongs to the disk, which outlives the ring's use.
        unsafe { self.ring.submission().push(&entry).is_ok() }
    }

    /// Submits what is queued.
    pub(crate) fn kick(&mut self) -> io::Result<()> {
        loop {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Out of resources for now: what is queued is submitted with the next kick,
                // after a completion, if there is one to wait for.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && self.in_flight() > self.ring.submission().len() =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Collects finished requests into `out`; resubmits the rest of short transfers.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let _ = self.eventfd.read();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, result) in cqes {
            if (user_data >> 32) as u32 != self.generation {
                continue;
            }
            let slot = (user_data & 0xffff_ffff) as usize;
            let Some(mut f) = self.slots.get_mut(slot).and_then(Option::take) else {
                log::warn!("virtio-blk: io_uring completion for an empty slot {slot}");
                continue;
            };
            let status = if result < 0 {
                log::warn!(
                    "virtio-blk: {:?} at byte {}: {}",
                    f.req.kind,
                    f.req.offset(),
                    io::Error::from_raw_os_error(-result)
                );
                status::IOERR
            } else if f.kind == Kind::Flush {
                status::OK
            } else if result == 0 {
                log::warn!(
                    "virtio-blk: {:?} at byte {}: end of file",
                    f.req.kind,
                    f.offset
                );
                status::IOERR
            } else {
                let n = result as u64;
                f.remaining = f.remaining.saturating_sub(n);
                f.offset += n;
                crate::virtio::block::fileio::advance(&mut f.iov.0, &mut f.first, n as usize);
                if f.remaining > 0 && f.first < f.iov.0.len() {
                    self.slots[slot] = Some(f);
                    if self.push(slot) {
                        continue;
                    }
                    let Some(back) = self.slots[slot].take() else {
                        continue;
                    };
                    f = back;
                    status::IOERR
                } else {
                    status::OK
                }
            };
            self.free.push(slot);
            out.push(f.req.complete(status));
        }
        Ok(())
    }

    /// Waits for every request in flight and forgets them.
    pub(crate) fn drain(&mut self) {
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::error!(
                        "virtio-blk: cannot wait for {} io_uring requests: {e}; abandoning them",
                        self.in_flight()
                    );
                    break;
                }
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for user_data in done {
                if (user_data >> 32) as u32 != self.generation {
                    continue;
                }
                let slot = (user_data & 0xffff_ffff) as usize;
                if self.slots.get_mut(slot).and_then(Option::take).is_some() {
                    self.free.push(slot);
                }
            }
        }
        // Whatever is left (after a failure) is forgotten; its completions, if they ever
        // come, carry the old generation.
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.take().is_some() {
                self.free.push(i);
            }
        }
        self.generation = self.generation.wrapping_add(1);
        let _ = self.eventfd.read();
    }
}
