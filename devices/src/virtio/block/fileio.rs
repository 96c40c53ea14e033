//! The file operations of the block device, as blocking system calls on the device thread:
//! vectored reads and writes straight into guest memory (preadv, pwritev), fdatasync, and
//! zeroing or deallocating ranges (fallocate, with a fallback to writing zeros).

use std::io;
use std::os::fd::RawFd;

use super::request::HostBuf;

/// The most iovecs one preadv/pwritev takes.
const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

/// Drops the first `n` bytes of `iov` (starting at `*first`).
pub(crate) fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            *first += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    while *first < iov.len() && iov[*first].iov_len == 0 {
        *first += 1;
    }
}

fn vectored(fd: RawFd, mut offset: u64, bufs: &[HostBuf], write: bool) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs.iter().map(HostBuf::iovec).collect();
    let mut first = 0;
    advance(&mut iov, &mut first, 0);
    while first < iov.len() {
        let n = (iov.len() - first).min(IOV_MAX) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ptr = iov[first..].as_ptr();
        let r = if write {
            // SAFETY: the iovecs point into guest memory, mapped for as long as the device
            // exists (parse checked every range); pwritev only reads them.
            unsafe { libc::pwritev(fd, ptr, n, off) }
        } else {
            // SAFETY: as above; preadv writes only into those ranges, which the guest gave
            // the device to fill.
            unsafe { libc::preadv(fd, ptr, n, off) }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        offset += r as u64;
        advance(&mut iov, &mut first, r as usize);
    }
    Ok(())
}

/// Reads the file at `offset` into `bufs`, all of them.
pub(crate) fn read_exact_at(fd: RawFd, offset: u64, bufs: &[HostBuf]) -> io::Result<()> {
    vectored(fd, offset, bufs, false)
}

/// Writes `bufs` into the file at `offset`, all of them.
pub(crate) fn write_all_at(fd: RawFd, offset: u64, bufs: &[HostBuf]) -> io::Result<()> {
    vectored(fd, offset, bufs, true)
}

/// Reads up to `buf.len()` bytes at `offset` into a host buffer; returns how many (less only
/// at the end of the file).
pub(crate) fn pread_full(fd: RawFd, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: pread writes at most the given length into our buffer.
        let r = unsafe { libc::pread(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
        offset += r as u64;
    }
    Ok(done)
}

/// Writes all of a host buffer at `offset`.
pub(crate) fn pwrite_all(fd: RawFd, mut offset: u64, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: pwrite reads at most the given length from our buffer.
        let r = unsafe { libc::pwrite(fd, buf[done..].as_ptr().cast(), buf.len() - done, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += r as usize;
        offset += r as u64;
    }
    Ok(())
}

/// fdatasync: the data written so far survives a crash.
pub(crate) fn datasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync takes only a descriptor.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// fallocate with `mode` over `offset..offset + len`.
pub(crate) fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate takes a descriptor and integers.
        if unsafe { libc::fallocate(fd, mode, off, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Mode of fallocate that deallocates a range (reads then return zeros).
pub(crate) const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Mode of fallocate that zeroes a range, keeping it allocated.
pub(crate) const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Whether an fallocate error means "this file system cannot do that" (try something else)
/// rather than an I/O error.
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

/// Zeroes `offset..offset + len`: a hole when `unmap` allows it, else a zeroed range; where
/// the file system can do neither, zeros are written.
pub(crate) fn zero_range(fd: RawFd, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let modes = if unmap {
        [PUNCH_HOLE, ZERO_RANGE]
    } else {
        [ZERO_RANGE, PUNCH_HOLE]
    };
    for mode in modes {
        match fallocate(fd, mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    write_zeros(fd, offset, len)
}

/// Writes `len` zero bytes at `offset`.
pub(crate) fn write_zeros(fd: RawFd, mut offset: u64, mut len: u64) -> io::Result<()> {
    let zeros = vec![0u8; 64 << 10];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        pwrite_all(fd, offset, &zeros[..n])?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let mut a = [0u8; 8];
        let base = a.as_mut_ptr();
        let mut iov = [
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 2,
            },
            libc::iovec {
                iov_base: base.wrapping_add(2).cast(),
                iov_len: 0,
            },
            libc::iovec {
                iov_base: base.wrapping_add(2).cast(),
                iov_len: 6,
            },
        ];
        let mut first = 0;
        advance(&mut iov, &mut first, 3);
        assert_eq!(first, 2);
        assert_eq!(iov[2].iov_len, 5);
        assert_eq!(iov[2].iov_base, base.wrapping_add(3).cast());
        advance(&mut iov, &mut first, 5);
        assert_eq!(first, 3);
    }
}
