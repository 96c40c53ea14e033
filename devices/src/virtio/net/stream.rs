//! A stream socket to passt (one end of a socketpair handed to passt with `--fd`): each
//! Ethernet frame is preceded by its length as a 4-byte big-endian number (passt's "qemu"
//! framing), in both directions, and there is no virtio-net header on the stream.
//!
//! The socket is nonblocking. Received bytes are buffered until a whole frame is there, so a
//! length or a frame split over several reads is put back together; bytes the socket could
//! not take are kept and sent first once it is writable again. Both survive device resets,
//! so that the framing never goes out of step.
//!
//! Writability is watched through an epoll set of its own ([`FrameStream::writable_fd`]),
//! which holds the socket (EPOLLOUT) only while unsent bytes wait: that descriptor is
//! readable exactly when the device thread should try to send again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use super::tap::VNET_HDR_LEN;

/// The longest frame accepted on the stream: 64 KiB behind an Ethernet header with a VLAN
/// tag. A length of 0 or above this is a protocol error.
pub const MAX_STREAM_FRAME: usize = 65535 + 18;

/// The length prefix of each frame on the stream.
const PREFIX_LEN: usize = 4;

/// The receive buffer: room for several frames, and always for one whole frame.
const INBUF_LEN: usize = 4 * (PREFIX_LEN + MAX_STREAM_FRAME);

/// Why the stream failed. The stream cannot be used after any of these.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// passt closed its end (it exited or was killed).
    #[error("passt closed its stream (has passt exited?)")]
    Closed,
    /// passt sent a frame length out of range: the framing is lost.
    #[error("stream to passt: protocol error: frame length {0} (must be 1 to {MAX_STREAM_FRAME})")]
    BadLength(u32),
    /// The descriptor is not a stream socket.
    #[error("stream to passt: the descriptor is not a stream socket")]
    NotAStream,
    /// A system call on the stream failed.
    #[error("stream to passt: {op}: {source}")]
    Io {
        /// What failed.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl StreamError {
    fn last(op: &'static str) -> Self {
        Self::Io {
            op,
            source: io::Error::last_os_error(),
        }
    }
}

/// The framing state: what was received and not yet handed out, what was not yet sent.
struct Framing {
    inbuf: Vec<u8>,
    /// `inbuf[start..end]` holds received bytes not yet handed out.
    start: usize,
    end: usize,
    /// Bytes (prefixes and frames) the socket has not taken yet, from `unsent_off`.
    unsent: Vec<u8>,
    unsent_off: usize,
    /// Whether the socket is in the writability epoll set.
    watching: bool,
}

/// A stream to passt carrying length-prefixed Ethernet frames.
pub struct FrameStream {
    fd: OwnedFd,
    out_epoll: OwnedFd,
    state: Mutex<Framing>,
}

impl std::fmt::Debug for FrameStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameStream")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

/// Whether an errno means "try again later".
fn would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// Whether an errno means the peer is gone.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN)
    )
}

impl FrameStream {
    /// Takes over `fd`, a connected stream socket whose other end passt serves; makes it
    /// nonblocking.
    pub fn new(fd: OwnedFd) -> Result<Self, StreamError> {
        let raw = fd.as_raw_fd();
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the int we own.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                &mut ty as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSOCK) {
                return Err(StreamError::NotAStream);
            }
            return Err(StreamError::Io {
                op: "getsockopt(SO_TYPE)",
                source: e,
            });
        }
        if ty != libc::SOCK_STREAM {
            return Err(StreamError::NotAStream);
        }
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(StreamError::last("fcntl(F_GETFL)"));
        }
        // SAFETY: F_SETFL takes its argument by value.
        if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(StreamError::last("fcntl(F_SETFL)"));
        }
        // SAFETY: epoll_create1 has no memory arguments; the descriptor is owned below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(StreamError::last("epoll_create1"));
        }
        // SAFETY: `ep` is a new descriptor nothing else owns.
        let out_epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        Ok(Self {
            fd,
            out_epoll,
            state: Mutex::new(Framing {
                inbuf: vec![0; INBUF_LEN],
                start: 0,
                end: 0,
                unsent: Vec::new(),
                unsent_off: 0,
                watching: false,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, Framing> {
        // The state stays consistent even if a holder panicked: every update is complete
        // before anything that could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A descriptor that is readable while the stream holds unsent bytes and can take more:
    /// wait on it (for reading) to resume sending.
    pub fn writable_fd(&self) -> RawFd {
        self.out_epoll.as_raw_fd()
    }

    /// The complete frame at the front of the received bytes, as (offset, length) in
    /// `inbuf`, if there is one.
    fn buffered(st: &Framing) -> Result<Option<(usize, usize)>, StreamError> {
        let have = st.end - st.start;
        if have < PREFIX_LEN {
            return Ok(None);
        }
        let mut p = [0u8; PREFIX_LEN];
        p.copy_from_slice(&st.inbuf[st.start..st.start + PREFIX_LEN]);
        let len = u32::from_be_bytes(p);
        if len == 0 || len as usize > MAX_STREAM_FRAME {
            return Err(StreamError::BadLength(len));
        }
        let len = len as usize;
        if have < PREFIX_LEN + len {
            return Ok(None);
        }
        Ok(Some((st.start + PREFIX_LEN, len)))
    }

    /// Whether a whole frame is already buffered (so the socket may not look readable
    /// although [`read_frame`](Self::read_frame) has one).
    pub fn has_buffered_frame(&self) -> bool {
        matches!(Self::buffered(&self.state()), Ok(Some(_)))
    }

    /// Reads the next frame into `buf` behind a zeroed `virtio_net_hdr_v1`
    /// ([`VNET_HDR_LEN`] bytes); returns the header and frame length, or `None` when no whole
    /// frame has arrived yet. `buf` must hold [`VNET_HDR_LEN`] + [`MAX_STREAM_FRAME`] bytes.
    pub fn read_frame(&self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        let mut guard = self.state();
        let st = &mut *guard;
        loop {
            if let Some((off, len)) = Self::buffered(st)? {
                let total = VNET_HDR_LEN + len;
                if buf.len() < total {
                    return Err(StreamError::Io {
                        op: "read",
                        source: io::Error::other("receive buffer too small"),
                    });
                }
                buf[..VNET_HDR_LEN].fill(0);
                buf[VNET_HDR_LEN..total].copy_from_slice(&st.inbuf[off..off + len]);
                st.start = off + len;
                if st.start == st.end {
                    st.start = 0;
                    st.end = 0;
                }
                return Ok(Some(total));
            }
            // Not enough: make room for a whole frame after what is there, then read.
            if st.start > 0 && st.inbuf.len() - st.start < PREFIX_LEN + MAX_STREAM_FRAME {
                st.inbuf.copy_within(st.start..st.end, 0);
                st.end -= st.start;
                st.start = 0;
            }
            let room = &mut st.inbuf[st.end..];
            // SAFETY: recv writes at most `room.len()` bytes into `room`, which we borrow
            // mutably for the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    room.as_mut_ptr() as *mut libc::c_void,
                    room.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return Ok(None);
                }
                if peer_gone(&e) {
                    return Err(StreamError::Closed);
                }
                return Err(StreamError::Io {
                    op: "recv",
                    source: e,
                });
            }
            if n == 0 {
                return Err(StreamError::Closed);
            }
            st.end += n as usize;
        }
    }

    /// Whether bytes wait for the socket to take them.
    pub fn is_blocked(&self) -> bool {
        let st = self.state();
        st.unsent_off < st.unsent.len()
    }

    /// One nonblocking sendmsg of `iov`; the bytes taken (0 when the socket is full).
    fn send_iov(&self, iov: &mut [libc::iovec]) -> Result<usize, StreamError> {
        loop {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len();
            // SAFETY: sendmsg reads the iovecs, which point into buffers the caller borrows
            // for the call, and the msghdr we own.
            let n = unsafe {
                libc::sendmsg(
                    self.fd.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if would_block(&e) {
                return Ok(0);
            }
            if peer_gone(&e) {
                return Err(StreamError::Closed);
            }
            return Err(StreamError::Io {
                op: "sendmsg",
                source: e,
            });
        }
    }

    /// Starts or stops watching the socket for writability.
    fn watch(&self, st: &mut Framing, on: bool) -> Result<(), StreamError> {
        if st.watching == on {
            return Ok(());
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLOUT as u32,
            u64: 0,
        };
        let op = if on {
            libc::EPOLL_CTL_ADD
        } else {
            libc::EPOLL_CTL_DEL
        };
        // SAFETY: epoll_ctl reads the event we own; both descriptors are ours.
        let r = unsafe {
            libc::epoll_ctl(self.out_epoll.as_raw_fd(), op, self.fd.as_raw_fd(), &mut ev)
        };
        if r < 0 {
            return Err(StreamError::last("epoll_ctl"));
        }
        st.watching = on;
        Ok(())
    }

    /// Sends what an earlier send left over; true when nothing is left (the stream takes new
    /// frames), false while the socket is still full.
    pub fn flush(&self) -> Result<bool, StreamError> {
        let mut guard = self.state();
        let st = &mut *guard;
        while st.unsent_off < st.unsent.len() {
            let rest = &st.unsent[st.unsent_off..];
            let mut iov = [libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            }];
            let n = self.send_iov(&mut iov)?;
            if n == 0 {
                self.watch(st, true)?;
                return Ok(false);
            }
            st.unsent_off += n;
        }
        st.unsent.clear();
        st.unsent_off = 0;
        self.watch(st, false)?;
        Ok(true)
    }

    /// Sends `frame` (an Ethernet frame, 1 to [`MAX_STREAM_FRAME`] bytes) behind its length.
    /// What the socket does not take now is kept, sent by [`flush`](Self::flush) once it
    /// can; the frame is never lost. Frames sent while [`is_blocked`](Self::is_blocked)
    /// queue up behind the unsent bytes.
    pub fn send_frame(&self, frame: &[u8]) -> Result<(), StreamError> {
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&l| l > 0 && l as usize <= MAX_STREAM_FRAME)
            .ok_or(StreamError::BadLength(
                u32::try_from(frame.len()).unwrap_or(u32::MAX),
            ))?;
        let prefix = len.to_be_bytes();
        let mut guard = self.state();
        let st = &mut *guard;
        let sent = if st.unsent_off < st.unsent.len() {
            0
        } else {
            let mut iov = [
                libc::iovec {
                    iov_base: prefix.as_ptr() as *mut libc::c_void,
                    iov_len: PREFIX_LEN,
                },
                libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                },
            ];
            self.send_iov(&mut iov)?
        };
        if sent == PREFIX_LEN + frame.len() {
            return Ok(());
        }
        if sent < PREFIX_LEN {
            st.unsent.extend_from_slice(&prefix[sent..]);
            st.unsent.extend_from_slice(frame);
        } else {
            st.unsent.extend_from_slice(&frame[sent - PREFIX_LEN..]);
        }
        self.watch(st, true)
    }
}

impl AsRawFd for FrameStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
