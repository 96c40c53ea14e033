//! The sync engine: each request is executed with blocking system calls on the device thread
//! (preadv/pwritev straight into guest memory, fdatasync, fallocate).

use crate::virtio::block::disk::Disk;
use crate::virtio::block::request::{
    copy_to_bufs, status, Completion, Request, RequestKind, ID_BYTES, SECTOR_SIZE,
};

/// What the sync engine calls on the device thread, beyond the base list: the file I/O and
/// the rate limiter's timerfd.
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
];

/// Executes `req` on `disk` now.
pub(crate) fn execute(req: &Request, disk: &mut Disk, serial: &[u8; ID_BYTES]) -> Completion {
    let result = match req.kind {
        RequestKind::In { .. } => disk.read(req.offset(), &req.data),
        RequestKind::Out { .. } => disk.write(req.offset(), &req.data),
        RequestKind::Flush => disk.flush(),
        RequestKind::GetId => {
            copy_to_bufs(&req.data, serial);
            Ok(())
        }
        RequestKind::Discard { sectors, .. } => {
            disk.discard(req.offset(), u64::from(sectors) * SECTOR_SIZE)
        }
        RequestKind::WriteZeroes { sectors, unmap, .. } => {
            disk.write_zeroes(req.offset(), u64::from(sectors) * SECTOR_SIZE, unmap)
        }
    };
    match result {
        Ok(()) => req.complete(status::OK),
        Err(e) => {
            log::warn!("virtio-blk: {:?} at byte {}: {e}", req.kind, req.offset());
            req.complete(status::IOERR)
        }
    }
}
