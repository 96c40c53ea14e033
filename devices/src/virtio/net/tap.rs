//! A TAP interface opened by name through `/dev/net/tun`: Ethernet frames, each preceded by a
//! 12-byte `virtio_net_hdr_v1` (IFF_VNET_HDR with TUNSETVNETHDRSZ 12), no packet information
//! (IFF_NO_PI), nonblocking.
//!
//! The interface must already exist (created by the host's administrator, `ip tuntap add`):
//! opening a name that does not exist fails rather than creating a new interface.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The size of the virtio-net header cgvm uses on the tap: `virtio_net_hdr_v1` (flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// The longest interface name Linux accepts (IFNAMSIZ less the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

/// Offload flags (TUNSETOFFLOAD): the tap may hand over frames with a partial checksum.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// Offload flags: TCP segmentation over IPv4.
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// Offload flags: TCP segmentation over IPv6.
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// Offload flags: TCP segmentation with ECN.
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
/// Offload flags: UDP fragmentation offload.
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

/// Why a tap could not be opened or configured. Each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has a character Linux refuses.
    #[error("tap {name:?}: invalid interface name: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("tap {name}: cannot open /dev/net/tun: {source}")]
    OpenTun {
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No interface of that name exists (in this network namespace).
    #[error(
        "tap {0}: no such network interface (create it first, e.g. `ip tuntap add {0} mode tap`)"
    )]
    NoSuchDevice(String),
    /// The process may not attach to the interface (not its owner, no CAP_NET_ADMIN).
    #[error("tap {0}: permission denied (the interface's owner or CAP_NET_ADMIN is needed)")]
    PermissionDenied(String),
    /// Another process (or descriptor) is attached to the interface.
    #[error("tap {0}: the interface is busy (another process has it open)")]
    Busy(String),
    /// The interface exists but is not a TAP interface with these flags (a TUN device, or
    /// a tap created without IFF_VNET_HDR support).
    #[error("tap {0}: not a TAP interface usable with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    NotATap(String),
    /// Another ioctl failed.
    #[error("tap {name}: {op} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a short) in a 24-byte
/// union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// The request for the TAP interface `name` (at most [`MAX_NAME_LEN`] bytes, checked by
    /// the callers) with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    fn tap(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    supported_offloads: u32,
}

/// Checks `name` as Linux's `dev_valid_name` would; the reason when it would refuse it.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not interface names");
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err("contains NUL, '/', ':' or white space");
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), TapError> {
    check_name(name).map_err(|reason| TapError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

impl Tap {
    /// Opens the existing TAP interface `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, header
    /// size 12, nonblocking, close-on-exec) and finds out which offloads the kernel accepts;
    /// none is enabled until [`set_offloads`](Self::set_offloads).
    pub fn open(name: &str) -> Result<Self, TapError> {
        validate_name(name)?;
        let cname = CString::new(name).map_err(|_| TapError::InvalidName {
            name: name.to_string(),
            reason: "contains NUL",
        })?;
        // Refuse to create an interface: TUNSETIFF would make a new one of that name.
        // SAFETY: if_nametoindex reads the NUL-terminated string we own.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchDevice(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq::tap(name);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReq has its layout and size
        // (40 bytes) and lives for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::ENODEV) | Some(libc::ENXIO) => TapError::NoSuchDevice(name),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EINVAL) => TapError::NotATap(name),
                _ => TapError::Ioctl {
                    name,
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
            supported_offloads: 0,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid for the call.
        let r = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if r < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        let mut tap = tap;
        tap.supported_offloads = tap.probe_offloads()?;
        Ok(tap)
    }

    fn ioctl_error(&self, op: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source: io::Error::last_os_error(),
        }
    }

    fn try_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The largest of the usual offload sets the kernel accepts (kernels since 4.14 refuse
    /// UFO on some versions), leaving offloads off.
    fn probe_offloads(&self) -> Result<u32, TapError> {
        const CANDIDATES: [u32; 4] = [
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
            TUN_F_CSUM,
        ];
        let found = CANDIDATES
            .iter()
            .copied()
            .find(|&f| self.try_offload(f).is_ok())
            .unwrap_or(0);
        self.try_offload(0).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            op: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(found)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offload flags (`TUN_F_*`) the kernel accepted when the tap was opened.
    pub fn supported_offloads(&self) -> u32 {
        self.supported_offloads
    }

    /// Tells the kernel which offloaded frames it may hand to us (and so to the guest):
    /// `flags` restricted to what it supports; without TUN_F_CSUM nothing else is possible.
    /// Returns the flags set.
    pub fn set_offloads(&self, flags: u32) -> Result<u32, TapError> {
        let mut flags = flags & self.supported_offloads;
        if flags & TUN_F_CSUM == 0 {
            flags = 0;
        }
        self.try_offload(flags).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            op: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(flags)
    }

    /// Reads one frame (with its virtio-net header) into `buf`; `None` when there is none.
    /// A frame longer than `buf` is truncated by the kernel.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one frame, `buf` being its virtio-net header and the Ethernet frame.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&self.file).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Test helpers: a TAP interface in a private network namespace.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::time::Duration;

    /// Whether the tests may create interfaces (root); prints why not otherwise.
    pub fn can_create_taps(test: &str) -> bool {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: creating a TAP interface needs root");
            return false;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("{test}: skipped: no /dev/net/tun");
            return false;
        }
        true
    }

    /// Runs `body` on a new thread that first moves to a network namespace of its own, so
    /// interfaces it creates are invisible to the host and vanish with it.
    pub fn in_new_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) affects only this thread's namespaces.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", io::Error::last_os_error());
            body()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Creates a persistent TAP interface `name` in the current namespace, without IPv6 (so
    /// that the kernel sends no router solicitations on it), and brings it up.
    pub fn create_tap(name: &str) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq::tap(name);
        // SAFETY: TUNSETIFF with a struct ifreq we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        assert_eq!(r, 0, "TUNSETIFF: {}", io::Error::last_os_error());
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
        assert_eq!(r, 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
        drop(file);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // SAFETY: a plain datagram socket, closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a struct ifreq we own.
        unsafe {
            assert_eq!(
                libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req as *mut IfReq),
                0
            );
            req.flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(
                libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req as *mut IfReq),
                0
            );
        }
        // Jumbo frames, so that tests can send frames spanning several receive buffers.
        let mut mtu = [0u8; 40];
        mtu[..name.len()].copy_from_slice(name.as_bytes());
        mtu[16..20].copy_from_slice(&9000i32.to_ne_bytes());
        // SAFETY: SIOCSIFMTU reads a 40-byte struct ifreq (the MTU an int after the name);
        // the socket is ours and closed here.
        unsafe {
            assert_eq!(libc::ioctl(s, libc::SIOCSIFMTU, mtu.as_mut_ptr()), 0);
            libc::close(s);
        }
    }

    /// Waits for `frame` on the tap, skipping others; returns the read length.
    pub fn wait_read(tap: &Tap, buf: &mut [u8], frame: &[u8]) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            match tap.read_frame(buf).unwrap() {
                Some(n) if n > VNET_HDR_LEN && &buf[VNET_HDR_LEN..n] == frame => return n,
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        panic!("frame not read from the tap");
    }

    /// An Ethernet frame of `len` bytes with a local experimental ethertype and a payload
    /// made from `seed`.
    pub fn test_frame(seed: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        for (i, b) in f[14..].iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8).wrapping_mul(7);
        }
        f
    }

    /// A raw packet socket on interface `name` (all protocols), nonblocking: what it sends
    /// reaches the tap's reader, and it sees what is written to the tap.
    pub struct PacketSocket(std::os::fd::OwnedFd);

    impl PacketSocket {
        /// Opens the socket and binds it to `name`.
        pub fn bind(name: &str) -> Self {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: a packet socket; its descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            // SAFETY: fd was just opened and is owned only here.
            let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            let cname = CString::new(name).unwrap();
            // SAFETY: reads the NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert!(index != 0);
            // SAFETY: sockaddr_ll is plain old data; all zeros is valid.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = index as i32;
            // SAFETY: bind reads a sockaddr_ll of the given size.
            let r = unsafe {
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            Self(owned)
        }

        /// Sends one Ethernet frame out of the interface (to the tap's reader).
        pub fn send(&self, frame: &[u8]) {
            // SAFETY: send reads `frame`.
            let r =
                unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                r,
                frame.len() as isize,
                "send: {}",
                io::Error::last_os_error()
            );
        }

        /// Receives frames for up to `wait`, returning the first that `pick` accepts.
        pub fn recv_matching(
            &self,
            wait: std::time::Duration,
            pick: impl Fn(&[u8]) -> bool,
        ) -> Option<Vec<u8>> {
            let deadline = std::time::Instant::now() + wait;
            let mut buf = vec![0u8; 70_000];
            while std::time::Instant::now() < deadline {
                // SAFETY: recv writes at most buf.len() bytes into buf.
                let r = unsafe {
                    libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if r > 0 && pick(&buf[..r as usize]) {
                    return Some(buf[..r as usize].to_vec());
                }
                if r <= 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::time::Duration;

    #[test]
    fn tap_names_are_checked_before_any_system_call() {
        for bad in ["", "a-name-of-16-byt", "a/b", "a:b", "a b", ".", ".."] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn opening_a_missing_tap_names_it_and_creates_nothing() {
        if !can_create_taps("opening_a_missing_tap_names_it_and_creates_nothing") {
            return;
        }
        in_new_netns(|| {
            let e = Tap::open("cgvmnotap0").unwrap_err();
            assert!(matches!(e, TapError::NoSuchDevice(_)), "{e}");
            assert!(e.to_string().contains("cgvmnotap0"), "{e}");
            let c = CString::new("cgvmnotap0").unwrap();
            // SAFETY: reads the NUL-terminated name.
            assert_eq!(unsafe { libc::if_nametoindex(c.as_ptr()) }, 0);
        });
    }

    #[test]
    fn a_tap_opens_once_and_exchanges_frames_with_vnet_headers() {
        if !can_create_taps("a_tap_opens_once_and_exchanges_frames_with_vnet_headers") {
            return;
        }
        in_new_netns(|| {
            create_tap("cgvmtap0");
            let tap = Tap::open("cgvmtap0").unwrap();
            assert_eq!(tap.name(), "cgvmtap0");
            assert!(tap.supported_offloads() & TUN_F_CSUM != 0);
            // A second opener is refused, naming the tap.
            let e = Tap::open("cgvmtap0").unwrap_err();
            assert!(matches!(e, TapError::Busy(_)), "{e}");
            assert!(e.to_string().contains("cgvmtap0"));
            // Offloads: what is asked and supported; nothing without CSUM.
            assert_eq!(tap.set_offloads(TUN_F_TSO4).unwrap(), 0);
            let want = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            assert_eq!(tap.set_offloads(want).unwrap(), want);
            tap.set_offloads(0).unwrap();

            let mut buf = vec![0u8; 70_000];
            assert_eq!(tap.read_frame(&mut buf).unwrap(), None, "nonblocking");
            let sock = PacketSocket::bind("cgvmtap0");
            // Host to tap: the frame arrives behind a 12-byte header.
            let frame = test_frame(0x11, 200);
            sock.send(&frame);
            let n = wait_read(&tap, &mut buf, &frame);
            assert_eq!(n, VNET_HDR_LEN + frame.len());
            assert_eq!(&buf[VNET_HDR_LEN..n], &frame[..]);
            // Tap to host: header plus frame in, the frame out.
            let frame = test_frame(0x22, 300);
            let mut out = vec![0u8; VNET_HDR_LEN];
            out.extend_from_slice(&frame);
            assert_eq!(tap.write_frame(&out).unwrap(), out.len());
            let got = sock
                .recv_matching(Duration::from_secs(5), |f| f == &frame[..])
                .expect("the frame written to the tap reaches the interface");
            assert_eq!(got, frame);
            // SAFETY: TUNSETPERSIST by value; the interface goes with the descriptor.
            unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) };
        });
    }
}
