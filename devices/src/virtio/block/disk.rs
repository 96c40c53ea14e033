//! Opening a disk image, and the blocking file operations on it.
//!
//! Three ways to attach an image:
//! - read-write: the file is opened O_RDWR and FLUSH is fdatasync, so data a guest flushed
//!   survives a host crash or a SIGKILL of the VMM;
//! - read-only: opened O_RDONLY; the device refuses writes (and offers VIRTIO_BLK_F_RO);
//! - ephemeral: the image is opened O_RDONLY and never written. Guest writes go to an overlay
//!   that exists only as an open descriptor (O_TMPFILE in the image's directory, else in
//!   `$TMPDIR`; where O_TMPFILE is not supported, a file created and unlinked at once), so
//!   nothing is left behind however the process ends. The overlay is first made a reflink of
//!   the image (FICLONE: copy-on-write, same file system) and then used as a plain file;
//!   where that fails it is a [`SparseOverlay`]. FLUSH is a no-op: nothing of it outlives the
//!   VMM.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::fileio;
use super::overlay::SparseOverlay;
use super::request::{DiskInfo, HostBuf, SECTOR_SIZE};
use super::{BlockConfig, BlockError};

/// Where a disk's bytes are.
#[derive(Debug)]
pub(crate) enum Storage {
    /// One file used as it is: the image, or a reflinked overlay. `durable` makes FLUSH an
    /// fdatasync.
    Raw {
        /// The file.
        file: File,
        /// Whether FLUSH syncs it.
        durable: bool,
    },
    /// An image behind a sparse overlay.
    Sparse(SparseOverlay),
}

/// An open disk.
#[derive(Debug)]
pub(crate) struct Disk {
    capacity: u64,
    read_only: bool,
    storage: Storage,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> BlockError + 'a {
    move |source| BlockError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

impl Disk {
    /// Opens the disk `config` describes.
    pub(crate) fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        let path = &config.path;
        let writable = !config.read_only && !config.ephemeral;
        let mut image = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path, "cannot open"))?;
        let ft = image
            .metadata()
            .map_err(io_err(path, "cannot stat"))?
            .file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::NotADisk { path: path.clone() });
        }
        // The end of a block device is its size; its metadata says 0.
        let size = image
            .seek(SeekFrom::End(0))
            .map_err(io_err(path, "cannot find the size"))?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk: {}: size {size} is not a multiple of 512; the last {} bytes are \
                 not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let capacity = size / SECTOR_SIZE;
        let storage = if config.read_only {
            Storage::Raw {
                file: image,
                durable: false,
            }
        } else if config.ephemeral {
            ephemeral(path, image, size)?
        } else {
            Storage::Raw {
                file: image,
                durable: true,
            }
        };
        Ok(Self {
            capacity,
            read_only: config.read_only,
            storage,
        })
    }

    /// Size in sectors.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the guest may not write.
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// What request checks need to know.
    pub(crate) fn info(&self) -> DiskInfo {
        DiskInfo {
            capacity: self.capacity,
            read_only: self.read_only,
        }
    }

    /// A few words for the log.
    pub(crate) fn describe(&self) -> &'static str {
        match &self.storage {
            Storage::Raw { durable: true, .. } => "read-write",
            Storage::Raw { .. } if self.read_only => "read-only",
            Storage::Raw { .. } => "ephemeral, reflinked overlay",
            Storage::Sparse(_) => "ephemeral, sparse overlay",
        }
    }

    /// The file that all I/O goes to, where there is one (everything but a sparse
    /// overlay), and whether FLUSH must sync it.
    pub(crate) fn raw(&self) -> Option<(RawFd, bool)> {
        match &self.storage {
            Storage::Raw { file, durable } => Some((file.as_raw_fd(), *durable)),
            Storage::Sparse(_) => None,
        }
    }

    /// The sparse overlay, if that is what this disk is.
    #[cfg(test)]
    pub(crate) fn sparse(&self) -> Option<&SparseOverlay> {
        match &self.storage {
            Storage::Sparse(o) => Some(o),
            Storage::Raw { .. } => None,
        }
    }

    /// Reads at `offset` into `bufs`.
    pub(crate) fn read(&self, offset: u64, bufs: &[HostBuf]) -> io::Result<()> {
        match &self.storage {
            Storage::Raw { file, .. } => fileio::read_exact_at(file.as_raw_fd(), offset, bufs),
            Storage::Sparse(o) => o.read(offset, bufs),
        }
    }

    /// Writes `bufs` at `offset`.
    pub(crate) fn write(&mut self, offset: u64, bufs: &[HostBuf]) -> io::Result<()> {
        match &mut self.storage {
            Storage::Raw { file, .. } => fileio::write_all_at(file.as_raw_fd(), offset, bufs),
            Storage::Sparse(o) => o.write(offset, bufs),
        }
    }

    /// Makes completed writes durable (a no-op for read-only and ephemeral disks).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match &self.storage {
            Storage::Raw {
                file,
                durable: true,
            } => fileio::datasync(file.as_raw_fd()),
            _ => Ok(()),
        }
    }

    /// Deallocates a range; where the file system cannot, does nothing (a discard is a hint).
    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match &mut self.storage {
            Storage::Raw { file, .. } => {
                match fileio::fallocate(file.as_raw_fd(), fileio::PUNCH_HOLE, offset, len) {
                    Err(e) if fileio::unsupported(&e) => Ok(()),
                    r => r,
                }
            }
            Storage::Sparse(o) => o.zero(offset, len),
        }
    }

    /// Zeroes a range; `unmap` lets the file system deallocate it.
    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match &mut self.storage {
            Storage::Raw { file, .. } => fileio::zero_range(file.as_raw_fd(), offset, len, unmap),
            Storage::Sparse(o) => o.zero(offset, len),
        }
    }
}

/// The overlay of an ephemeral disk over `image` (`size` bytes).
fn ephemeral(path: &Path, image: File, size: u64) -> Result<Storage, BlockError> {
    let image_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (overlay, same_fs) = match anonymous_file(&image_dir) {
        Ok(f) => (f, true),
        Err(e) => {
            let tmp = std::env::temp_dir();
            log::debug!(
                "virtio-blk: no overlay in {}: {e}; trying {}",
                image_dir.display(),
                tmp.display()
            );
            let f = anonymous_file(&tmp).map_err(io_err(path, "cannot create the overlay"))?;
            (f, false)
        }
    };
    if same_fs {
        // SAFETY: FICLONE reads the source descriptor's number and changes only the file
        // behind `overlay`, which this process owns.
        let r = unsafe { libc::ioctl(overlay.as_raw_fd(), libc::FICLONE, image.as_raw_fd()) };
        if r == 0 {
            return Ok(Storage::Raw {
                file: overlay,
                durable: false,
            });
        }
        log::debug!(
            "virtio-blk: {}: no reflink ({}); using a sparse overlay",
            path.display(),
            io::Error::last_os_error()
        );
    }
    let sparse = SparseOverlay::new(image, overlay, size)
        .map_err(io_err(path, "cannot size the overlay"))?;
    Ok(Storage::Sparse(sparse))
}

/// A read-write file in `dir` that has no name: O_TMPFILE, else a file created and unlinked
/// at once.
pub(crate) fn anonymous_file(dir: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        // Only "O_TMPFILE is not supported here" falls back; other errors are real.
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            return Err(e)
        }
        Err(_) => {}
    }
    for attempt in 0..16u32 {
        let name = dir.join(format!(
            ".cgvm-overlay-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&name)
        {
            Ok(f) => {
                std::fs::remove_file(&name)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from(io::ErrorKind::AlreadyExists))
}
