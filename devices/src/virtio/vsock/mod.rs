//! virtio-vsock (device type 19) in Firecracker's model: the guest has a CID (3 or more);
//! the host side is a Unix socket, `uds_path`. A host process connects to it and writes
//! `CONNECT <port>\n`; it gets `OK <hostport>\n` once the guest's listener on that port
//! accepted, and the stream is joined to the guest's. A guest connection to host port P is
//! joined to the Unix socket `<uds_path>_P`, or refused (RST) when that cannot be reached.
//!
//! Three queues: rx (packets for the guest), tx (packets from it) and event (unused). The
//! configuration space is the guest's CID, a little-endian u64.

pub mod muxer;
pub mod packet;
#[cfg(test)]
mod test_util;

/// The seccomp kind of the vsock device thread.
pub(crate) fn seccomp_kind() -> &'static crate::seccomp::DeviceKind {
    &worker::KIND
}

#[cfg(test)]
mod tests;
mod worker;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::worker::{spawn, WorkerHandle};
use super::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice, TYPE_VSOCK};

pub use muxer::Muxer;
pub use worker::VsockWorker;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// The longest `uds_path`: room is left for `_<port>` within a Unix socket address.
pub const MAX_UDS_PATH_LEN: usize = 107 - 11;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0 to 2 are reserved (2 is the host) and u32::MAX is "any".
    #[error("vsock: guest CID {0} is invalid (it must be at least 3 and below 4294967295)")]
    BadCid(u64),
    /// The socket's directory does not exist.
    #[error("vsock: the directory of {0:?} does not exist")]
    NoDirectory(PathBuf),
    /// Something is already at the socket's path.
    #[error("vsock: {0:?} is already in use (remove it first)")]
    InUse(PathBuf),
    /// The path does not fit a Unix socket address with a port suffix.
    #[error("vsock: {0:?} is longer than {MAX_UDS_PATH_LEN} bytes")]
    PathTooLong(PathBuf),
    /// Binding the socket failed.
    #[error("vsock: cannot listen on {path:?}: {source}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The socket device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    worker: Option<WorkerHandle>,
}

impl Vsock {
    /// A device for the guest `cid` listening on `uds_path` (created here, removed when the
    /// device is dropped).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cid));
        }
        if uds_path.as_os_str().as_bytes().len() > MAX_UDS_PATH_LEN {
            return Err(VsockError::PathTooLong(uds_path.to_path_buf()));
        }
        let dir = match uds_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(VsockError::NoDirectory(uds_path.to_path_buf()));
        }
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::InUse(uds_path.to_path_buf()));
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                VsockError::InUse(uds_path.to_path_buf())
            } else {
                VsockError::Bind {
                    path: uds_path.to_path_buf(),
                    source,
                }
            }
        })?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let queues: [_; 3] = ctx
            .queues
            .try_into()
            .map_err(|_| ActivateError::MissingQueues { want: 3, got })?;
        if queues
            .iter()
            .enumerate()
            .any(|(i, q)| usize::from(q.index) != i)
        {
            return Err(ActivateError::MissingQueues { want: 3, got });
        }
        let listener = self.listener.try_clone()?;
        let muxer = Muxer::new(self.cid, &self.uds_path, listener)?;
        let worker = VsockWorker::new(ctx.mem, queues, ctx.interrupt.clone(), muxer, self.cid);
        self.worker = Some(spawn(worker, ctx.health, ctx.interrupt)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}
