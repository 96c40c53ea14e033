//! Network benchmark: how many frames and bytes the VMM's virtio-net device moves between the
//! guest and a host TAP interface, each way, and how much of the VMM's CPU time that costs.
//!
//! ```text
//! cargo bench --bench net -- [--seconds N] [--scenarios a,b] [--transports mmio,pci]
//!                            [--sample N] [--vmm PATH] [--kernel PATH]
//! ```
//!
//! It needs root (network namespaces, a TAP interface, packet sockets). A network namespace
//! `cgvm-bench-PID` is made with a TAP interface `cgvmtap0` in it (IPv6 off, no address, link
//! up); every run of the VMM and every host-side socket is in that namespace, and the
//! namespace (with the tap) is deleted at the end, whatever happened. One VMM run per
//! scenario and virtio transport (`--transports`, default both, each scenario on one after
//! the other): `ip netns exec NS VMM run --kernel PROBE --transport mmio|pci --net
//! tap:cgvmtap0,mac=02:00:00:00:00:01 --cpus 1 --memory 128 --console tty --timeout T
//! --cmdline "probe.tests=netbench probe.netbench=tx|rx probe.netbench_frame=F
//! probe.netbench_tso=0|1 probe.netbench_ms=... probe.transport=mmio|pci"`. The probe guest's
//! `netbench` check polls its queues (no interrupts) and prints `probe: netbench ready ...`
//! before its timed part, one line of figures after it and its ok line, which names the
//! device's transport (see resources/probe-guest/README.md): a run whose device was not on
//! the transport asked for fails, as does one whose guest clock (its TSC, at a rate it may have
//! timed wrong against the PIT on a busy host) disagrees with the host's between the guest's
//! ready and figures lines. Scenarios:
//!
//! - `tx-1514`, `tx-64`: the guest keeps its transmit queue full of 1514-byte (or 64-byte)
//!   IPv4/TCP frames for N seconds; they reach the tap's host side and are dropped there (their
//!   destination MAC is no host's). The guest counts the frames the device took and the time.
//! - `tx-tso`: the same with 65214-byte TSO frames (45 segments of 1448 bytes behind a
//!   virtio-net header with gso_type TCPV4, gso_size 1448, NEEDS_CSUM), which the tap's kernel
//!   side takes as GSO packets. The first `--sample` frames that reach the tap are captured with
//!   a packet socket (PACKET_VNET_HDR) to show what really arrived: whole GSO packets or not
//!   (the socket is closed afterwards, so that its cost does not weigh on the rest).
//! - `rx-1514`, `rx-64`: the benchmark sends 1514-byte (64-byte) frames into the tap for N
//!   seconds through a packet socket bound to it (sendmmsg, 64 frames a call, as fast as it
//!   can), then end markers; the guest counts the frames that reach it and their time.
//! - `rx-tso`: the same with 65214-byte frames sent with a virtio-net header (gso_type TCPV4,
//!   gso_size 1448): the guest negotiated GUEST_CSUM and GUEST_TSO4, so the VMM sets the tap's
//!   offloads and the kernel hands it each frame whole; the guest counts how many arrived with
//!   a GSO header and the largest frame, which show whether they did.
//!
//! Figures, one row per scenario and transport: frames/s and Gbit/s (Ethernet frame bytes, no virtio-net header) by the guest's
//! count and its TSC; the tap's own counters (`/proc/net/dev` in the namespace) for what the
//! host's kernel got from the VMM or handed to it, and dropped; and the VMM's CPU time between
//! the guest's two lines, from `/proc/PID/task/*/stat`: the virtio-net device thread's per
//! frame and per byte (`dev`), and all its threads' (`VMM`, which includes the vCPU thread
//! that the polling guest keeps busy all the time). The host-side sender shares the machine
//! with the VMM: on a machine with few CPUs the receive figures are bounded by that too. With
//! `--pin`, the device thread gets the last CPU to itself and the vCPU, the VMM's other threads
//! and the sender share the others; on a 2-CPU machine that was worse for small received
//! frames (the sender, sharing a CPU with the spinning vCPU, fills the tap's 500-frame queue in
//! bursts) and better for TSO ones, so placement is left to the scheduler by default.
//!
//! Without `--kernel`, the probe guest is built with `resources/probe-guest/build.sh` into a
//! temporary directory. A failed scenario is reported, and the benchmark then exits with
//! status 1, after printing what it has.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{env, thread};

mod common;
#[path = "common/vmm.rs"]
mod vmm;

use common::{
    check_transport, check_vmm, kernel_or_probe, names_some, parse_checked, parse_number, pick,
    relative, Request, Result, TempDir, Transport,
};
use vmm::{field, HostState, RunLog, RunOptions, Vmm};

const USAGE: &str = "\
usage: cargo bench --bench net -- [OPTIONS]   (as root)
  --seconds N         seconds each scenario sends (default 3, at least 1)
  --scenarios LIST    tx-1514, tx-tso, tx-64, rx-1514, rx-tso, rx-64, comma-separated
                      (default all)
  --transports LIST   virtio transports to run each scenario on: mmio, pci, comma-separated
                      (default mmio,pci)
  --sample N          tx scenarios: frames captured at the tap to show what arrives
                      (default 2000; 0: none)
  --vmm PATH          the VMM binary (default: the cgvm that cargo built for this benchmark)
  --kernel PATH       the probe guest (default: build it with resources/probe-guest/build.sh)
  --no-seccomp        run the VMM with --no-seccomp (its device threads unconfined)
  --pin               give the VMM's device thread the last CPU to itself, everything else
                      the others (default: placement left to the scheduler)
  --help              this text";

/// The tap's name, inside the benchmark's own namespace.
const TAP: &str = "cgvmtap0";
/// The guest's MAC (given to the VMM).
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The source MAC of the frames the benchmark sends.
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The TCP port the guest counts frames for (the source port is one less).
const BENCH_PORT: u16 = 5201;
/// TSO: segment size, frame length (headers and 45 segments).
const TSO_MSS: u16 = 1448;
const HEADERS_LEN: usize = 14 + 20 + 20;
const TSO_FRAME_LEN: usize = HEADERS_LEN + 45 * TSO_MSS as usize;
/// The end marker's EtherType and payload.
const END_ETHERTYPE: u16 = 0x88b5;
const END_MAGIC: &[u8] = b"cgvm-netbench-end";
/// `struct virtio_net_hdr` of packet sockets (without num_buffers).
const PACKET_VNET_HDR_LEN: usize = 10;
/// Frames a sendmmsg call.
const SEND_BATCH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

/// A scenario: direction, frame length, TSO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scenario {
    name: &'static str,
    dir: Dir,
    frame: usize,
    tso: bool,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "tx-1514",
        dir: Dir::Tx,
        frame: 1514,
        tso: false,
    },
    Scenario {
        name: "tx-tso",
        dir: Dir::Tx,
        frame: TSO_FRAME_LEN,
        tso: true,
    },
    Scenario {
        name: "tx-64",
        dir: Dir::Tx,
        frame: 64,
        tso: false,
    },
    Scenario {
        name: "rx-1514",
        dir: Dir::Rx,
        frame: 1514,
        tso: false,
    },
    Scenario {
        name: "rx-tso",
        dir: Dir::Rx,
        frame: TSO_FRAME_LEN,
        tso: true,
    },
    Scenario {
        name: "rx-64",
        dir: Dir::Rx,
        frame: 64,
        tso: false,
    },
];

// --- options ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    run: RunOptions,
    scenarios: Vec<&'static Scenario>,
    sample: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            run: RunOptions::default(),
            scenarios: SCENARIOS.iter().collect(),
            sample: 2000,
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Request<Options>> {
    let set = |opts: &mut Options, flag: &str, value: &mut dyn FnMut() -> Result<String>| {
        match flag {
            "--sample" => opts.sample = parse_number(flag, &value()?)?,
            "--scenarios" => {
                opts.scenarios = pick(&value()?, &SCENARIOS, |s| s.name, "scenario", USAGE)?;
            }
            _ => return opts.run.set(flag, value, USAGE),
        }
        Ok(true)
    };
    parse_checked(args, USAGE, Options::default(), set, |opts| {
        opts.run.check()?;
        names_some("--scenarios", &opts.scenarios, "scenario")
    })
}

// --- the namespace ------------------------------------------------------------------------------

/// Runs `ip ARGS`; its stderr in the error.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e} (iproute2 is needed)"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A network namespace (made with `ip netns add`) holding the tap; deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    /// Makes the namespace and, in it, the tap `TAP` (IFF_VNET_HDR, IPv6 off, up).
    fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ip(&[
            "netns", "exec", name, "ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
        ])?;
        ns.run_in(|| {
            // The host's kernel would send router solicitations on the tap otherwise.
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6"), "1")
        })?
        .map_err(|e| format!("cannot turn IPv6 off on {TAP}: {e}"))?;
        ip(&["netns", "exec", name, "ip", "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that first joins the namespace (sockets it opens belong there).
    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        thread::spawn(move || -> Result<T> {
            let file =
                File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            // SAFETY: setns with a namespace file we hold open; it changes only this thread's
            // network namespace (CLONE_NEWNET is allowed in a multi-threaded process).
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns({}): {}",
                    path.display(),
                    io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| "a thread in the namespace panicked".to_string())?
    }

    /// The tap's counters now.
    fn counters(&self) -> Result<TapCounters> {
        let text = self
            .run_in(|| std::fs::read_to_string("/proc/thread-self/net/dev"))?
            .map_err(|e| format!("cannot read /proc/net/dev in the namespace: {e}"))?;
        parse_net_dev(&text, TAP).ok_or_else(|| format!("{TAP} is not in /proc/net/dev"))
    }

    /// The tap's interface index.
    fn ifindex(&self) -> Result<u32> {
        let index = self.run_in(|| {
            let name = std::ffi::CString::new(TAP).unwrap_or_default();
            // SAFETY: if_nametoindex reads the NUL-terminated string, which lives for the call.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })?;
        if index == 0 {
            return Err(format!("{TAP} has no interface index in the namespace"));
        }
        Ok(index)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deletes the tap with it.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("net bench: {e}");
        }
    }
}

/// A tap's counters: "receive" is what the host's kernel got from the VMM, "transmit" what it
/// handed to the VMM's queue (dropped: the queue was full).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TapCounters {
    rx_bytes: u64,
    rx_packets: u64,
    rx_dropped: u64,
    tx_bytes: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

impl TapCounters {
    fn since(&self, earlier: &TapCounters) -> TapCounters {
        TapCounters {
            rx_bytes: self.rx_bytes.wrapping_sub(earlier.rx_bytes),
            rx_packets: self.rx_packets.wrapping_sub(earlier.rx_packets),
            rx_dropped: self.rx_dropped.wrapping_sub(earlier.rx_dropped),
            tx_bytes: self.tx_bytes.wrapping_sub(earlier.tx_bytes),
            tx_packets: self.tx_packets.wrapping_sub(earlier.tx_packets),
            tx_dropped: self.tx_dropped.wrapping_sub(earlier.tx_dropped),
        }
    }
}

/// `name`'s line of `/proc/net/dev`: `name: rx bytes packets errs drop fifo frame compressed
/// multicast, tx bytes packets errs drop ...`.
fn parse_net_dev(text: &str, name: &str) -> Option<TapCounters> {
    let line = text.lines().find_map(|l| {
        let (n, rest) = l.split_once(':')?;
        (n.trim() == name).then_some(rest)
    })?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    Some(TapCounters {
        rx_bytes: *v.first()?,
        rx_packets: *v.get(1)?,
        rx_dropped: *v.get(3)?,
        tx_bytes: *v.get(8)?,
        tx_packets: *v.get(9)?,
        tx_dropped: *v.get(11)?,
    })
}

// --- frames -------------------------------------------------------------------------------------

/// Adds big-endian 16-bit words of `b` to `sum`.
fn add_words(mut sum: u64, b: &[u8]) -> u64 {
    for pair in b.chunks(2) {
        sum += u64::from(pair[0]) << 8 | pair.get(1).copied().map_or(0, u64::from);
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A packet socket's message for a benchmark frame of `len` bytes from the host to the guest:
/// the 10-byte `virtio_net_hdr` (for TSO: NEEDS_CSUM, gso_type TCPV4, gso_size 1448, the
/// TCP checksum field holding the pseudo-header sum; else zeros and a complete checksum),
/// then Ethernet, IPv4, TCP to port 5201 and a payload, as the probe guest builds them.
fn bench_message(len: usize, tso: bool) -> Vec<u8> {
    let mut m = vec![0u8; PACKET_VNET_HDR_LEN + len];
    if tso {
        m[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        m[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        m[2..4].copy_from_slice(&(HEADERS_LEN as u16).to_le_bytes());
        m[4..6].copy_from_slice(&TSO_MSS.to_le_bytes());
        m[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
        m[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: its checksum
    }
    let f = &mut m[PACKET_VNET_HDR_LEN..];
    f[0..6].copy_from_slice(&GUEST_MAC);
    f[6..12].copy_from_slice(&HOST_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let (src, dst) = ([10, 0, 2, 2], [10, 0, 2, 15]);
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let sum = !fold(add_words(0, ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    for (i, b) in f[HEADERS_LEN..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ ((i >> 8) as u8) ^ 0x5a;
    }
    let tcp_len = ip_len - 20;
    let tcp = &mut f[34..];
    tcp[0..2].copy_from_slice(&(BENCH_PORT - 1).to_be_bytes());
    tcp[2..4].copy_from_slice(&BENCH_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let pseudo = add_words(add_words(0, &src), &dst) + 6 + u64::from(tcp_len);
    let check = if tso {
        fold(pseudo)
    } else {
        !fold(add_words(pseudo, tcp))
    };
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    m
}

/// The end marker's message: a zero header, EtherType 0x88b5, "cgvm-netbench-end", 60 bytes.
fn end_message() -> Vec<u8> {
    let mut m = vec![0u8; PACKET_VNET_HDR_LEN + 60];
    let f = &mut m[PACKET_VNET_HDR_LEN..];
    f[0..6].copy_from_slice(&GUEST_MAC);
    f[6..12].copy_from_slice(&HOST_MAC);
    f[12..14].copy_from_slice(&END_ETHERTYPE.to_be_bytes());
    f[14..14 + END_MAGIC.len()].copy_from_slice(END_MAGIC);
    m
}

// --- packet sockets -----------------------------------------------------------------------------

/// An AF_PACKET socket bound to the tap, with PACKET_VNET_HDR: every message it sends or
/// receives starts with a 10-byte `virtio_net_hdr`.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    /// Opens one on the calling thread's namespace, bound to `ifindex`; `capture`: receives
    /// every frame (ETH_P_ALL), else it only sends.
    fn open(ifindex: u32, capture: bool) -> io::Result<Self> {
        let protocol = if capture {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: socket() takes plain integers; the descriptor it returns is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(protocol),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        sock.set_int(libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        if capture {
            // Best effort: a larger queue loses fewer of the sampled frames.
            let _ = sock.set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: SO_RCVTIMEO reads a timeval from the pointer, valid for the call.
            let r = unsafe {
                libc::setsockopt(
                    sock.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: sockaddr_ll is a C struct of integers; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: bind reads a sockaddr_ll of the given size from the pointer.
        let r = unsafe {
            libc::bind(
                sock.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: setsockopt reads one int from the pointer, valid for the call.
        let r = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `message` up to `n` times in one sendmmsg call; how many went.
    fn send_many(&self, message: &[u8], n: usize) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: message.as_ptr() as *mut libc::c_void,
            iov_len: message.len(),
        };
        // SAFETY: mmsghdr is a C struct of integers and pointers; all zeroes is valid.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every message points to `iov`, which points to `message`; all live for the
        // call, and the kernel only reads them (and writes msg_len).
        let r = unsafe {
            libc::sendmmsg(
                self.0.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Receives one frame's first bytes into `buf`: the message's full length (header
    /// included), or `None` after the receive timeout.
    fn recv_truncated(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let r = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(r as usize))
    }
}

/// What the benchmark sent into the tap.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    frames: u64,
    bytes: u64,
    /// sendmmsg calls that failed (ENOBUFS and the like), each retried.
    errors: u64,
    seconds: f64,
}

/// Sends `message` (a benchmark frame) as fast as the socket takes it for `seconds`, then,
/// after 200 ms, the end marker five times 20 ms apart.
fn send_frames(sock: &PacketSocket, message: &[u8], seconds: u64) -> Sent {
    let mut sent = Sent::default();
    let frame = (message.len() - PACKET_VNET_HDR_LEN) as u64;
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    while Instant::now() < until {
        match sock.send_many(message, SEND_BATCH) {
            Ok(n) => {
                sent.frames += n as u64;
                sent.bytes += n as u64 * frame;
            }
            Err(_) => {
                sent.errors += 1;
                thread::yield_now();
            }
        }
    }
    sent.seconds = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(200));
    let end = end_message();
    for _ in 0..5 {
        let _ = sock.send_many(&end, 1);
        thread::sleep(Duration::from_millis(20));
    }
    sent
}

/// What a sample of the frames that reached the tap looked like.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    frames: u64,
    /// With a GSO header (gso_type TCPV4).
    gso: u64,
    gso_size: u16,
    min_len: usize,
    max_len: usize,
}

/// Captures up to `max` benchmark frames from the guest (as they reach the tap), or until
/// `stop`; then the socket is closed.
fn sample_frames(sock: PacketSocket, max: usize, stop: &AtomicBool) -> Sample {
    let mut s = Sample {
        min_len: usize::MAX,
        ..Sample::default()
    };
    let mut buf = [0u8; 128];
    while (s.frames as usize) < max && !stop.load(Ordering::Relaxed) {
        let Ok(Some(n)) = sock.recv_truncated(&mut buf) else {
            continue;
        };
        let head = &buf[..n.min(buf.len())];
        let frame = head.get(PACKET_VNET_HDR_LEN..).unwrap_or_default();
        let to_port = frame.get(36..38) == Some(&BENCH_PORT.to_be_bytes()[..]);
        if frame.get(12..14) != Some(&[0x08, 0x00][..]) || !to_port {
            continue;
        }
        let len = n - PACKET_VNET_HDR_LEN;
        s.frames += 1;
        if head[1] & 0x7f == 1 {
            s.gso += 1;
            s.gso_size = u16::from_le_bytes([head[4], head[5]]);
        }
        s.min_len = s.min_len.min(len);
        s.max_len = s.max_len.max(len);
    }
    drop(sock);
    s
}

// --- runs ---------------------------------------------------------------------------------------

/// The guest's figures (its result line).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Guest {
    frames: u64,
    bytes: u64,
    ns: u64,
    /// rx: frames with a GSO header, over several buffers, the largest, others, how it ended.
    gso: Option<u64>,
    merged: Option<u64>,
    max: Option<u64>,
    other: Option<u64>,
    end_marker: Option<bool>,
}

impl Guest {
    fn parse(line: &str) -> Option<Self> {
        Some(Self {
            frames: field(line, "frames")?,
            bytes: field(line, "bytes")?,
            ns: field(line, "ns")?,
            gso: field(line, "gso"),
            merged: field(line, "merged"),
            max: field(line, "max"),
            other: field(line, "other"),
            end_marker: field::<String>(line, "end").map(|e| e == "marker"),
        })
    }

    fn frames_per_s(&self) -> f64 {
        self.frames as f64 * 1e9 / self.ns.max(1) as f64
    }

    fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.ns.max(1) as f64
    }
}

/// One scenario's run on one transport.
struct Run {
    scenario: &'static Scenario,
    transport: Transport,
    guest: Option<Guest>,
    tap: Option<TapCounters>,
    sent: Option<Sent>,
    sample: Option<Sample>,
    log: RunLog,
}

impl Run {
    fn new(scenario: &'static Scenario, transport: Transport) -> Self {
        Self {
            scenario,
            transport,
            guest: None,
            tap: None,
            sent: None,
            sample: None,
            log: RunLog::default(),
        }
    }
}

fn probe_cmdline(sc: &Scenario, seconds: u64) -> String {
    format!(
        "probe.tests=netbench probe.netbench={} probe.netbench_frame={} probe.netbench_tso={} \
         probe.netbench_ms={}",
        match sc.dir {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        },
        if sc.tso { 1514 } else { sc.frame },
        u8::from(sc.tso),
        seconds * 1000
    )
}

/// What every run needs.
struct Setup<'a> {
    opts: &'a Options,
    kernel: &'a Path,
    ns: &'a Netns,
    ifindex: u32,
    host: HostState,
}

/// Runs the VMM for one scenario on `transport` and measures it.
fn run_scenario(setup: &Setup<'_>, sc: &'static Scenario, transport: Transport) -> Run {
    let mut run = Run::new(sc, transport);
    if let Err(e) = drive(setup, &mut run) {
        run.log.failure = Some(e);
    }
    run
}

fn drive(setup: &Setup<'_>, run: &mut Run) -> Result<()> {
    let (opts, kernel, ns, ifindex) = (setup.opts, setup.kernel, setup.ns, setup.ifindex);
    let sc = run.scenario;
    eprintln!("net bench: {} on {}", sc.name, run.transport.name());
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut args: Vec<OsString> = ["netns", "exec", &ns.name].map(OsString::from).to_vec();
    args.push(opts.run.vmm.clone().into());
    args.extend(opts.run.run_args(
        kernel,
        run.transport,
        ["--net".into(), format!("tap:{TAP},mac={mac}").into()],
        &probe_cmdline(sc, opts.run.seconds),
    ));
    // The capture socket is bound before the guest sends, and closed after the sample.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = match (sc.dir, opts.sample) {
        (Dir::Tx, n) if n > 0 => {
            let sock = ns
                .run_in(move || PacketSocket::open(ifindex, true))?
                .map_err(|e| format!("cannot open a capture socket on {TAP}: {e}"))?;
            let stop = stop.clone();
            let pinning = setup.host.pinning.clone();
            Some(thread::spawn(move || {
                if let Some(p) = pinning {
                    // Best effort: an unpinned sampler still samples.
                    let _ = p.apply_here();
                }
                sample_frames(sock, n, &stop)
            }))
        }
        _ => None,
    };
    let sender = match sc.dir {
        Dir::Rx => Some(
            ns.run_in(move || PacketSocket::open(ifindex, false))?
                .map_err(|e| format!("cannot open a packet socket on {TAP}: {e}"))?,
        ),
        Dir::Tx => None,
    };
    let result = talk(setup, run, &args, sender);
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        run.sample = s.join().ok();
    }
    result
}

/// Starts the VMM, waits for the guest's lines (sending in between for rx), and collects.
fn talk(
    setup: &Setup<'_>,
    run: &mut Run,
    args: &[OsString],
    sender: Option<PacketSocket>,
) -> Result<()> {
    let (opts, ns) = (setup.opts, setup.ns);
    let sc = run.scenario;
    let vmm = Vmm::spawn(Path::new("ip"), args)?;
    let talked = (|| -> Result<()> {
        let ready = vmm.wait_ready(
            "probe: netbench ready",
            &mut run.log,
            setup.host.pinning.as_ref(),
        )?;
        let before = ns.counters()?;
        let sending = sender.map(|sock| {
            let message = bench_message(sc.frame, sc.tso);
            let seconds = opts.run.seconds;
            let pinning = setup.host.pinning.clone();
            thread::spawn(move || {
                if let Some(p) = pinning {
                    // Best effort: an unpinned sender still sends.
                    let _ = p.apply_here();
                }
                send_frames(&sock, &message, seconds)
            })
        });
        let prefix = match sc.dir {
            Dir::Tx => "probe: netbench tx ",
            Dir::Rx => "probe: netbench rx ",
        };
        // Joined before a missing result fails the run: the next run must not share the tap.
        let result = vmm.wait_figures(prefix, opts.run.seconds);
        if let Some(s) = sending {
            run.sent = s.join().ok();
        }
        let result = result?;
        run.tap = Some(ns.counters()?.since(&before));
        run.guest = Some(run.log.figures(&ready, &result, Guest::parse)?);
        Ok(())
    })();
    vmm.conclude(talked, &mut run.log)?;
    check_transport(&run.log.stdout, "netbench", run.transport)?;
    run.guest.map_or(Ok(()), |g| run.log.check_clock(g.ns))
}

// --- report -------------------------------------------------------------------------------------

fn report(setup: &Setup<'_>, runs: &[Run]) -> String {
    let (opts, kernel, ns) = (setup.opts, setup.kernel, setup.ns);
    let mut out = String::new();
    opts.run.write_title(&mut out, "network", kernel);
    let _ = writeln!(
        out,
        "tap {TAP} in network namespace {}, guest: 1 vCPU, {} s per scenario, {}",
        ns.name, opts.run.seconds, setup.host
    );
    let _ = writeln!(
        out,
        "{:8} {:9} {:>7} {:>12} {:>8} {:>9} {:>13} {:>12} {:>13} {:>6}",
        "scenario",
        "transport",
        "frame B",
        "frames/s",
        "vs mmio",
        "Gbit/s",
        "dev us/frame",
        "dev ns/byte",
        "VMM us/frame",
        "vCPU"
    );
    for run in runs {
        let sc = run.scenario;
        let t = run.transport.name();
        let Some(g) = run.guest.filter(|_| run.log.failure.is_none()) else {
            let _ = writeln!(
                out,
                "{:8} {t:9} {:>7} the run failed (below)",
                sc.name, sc.frame
            );
            continue;
        };
        let per = |s: Option<f64>, n: u64, scale: f64| match (s, n) {
            (Some(s), n) if n > 0 => format!("{:.3}", s * scale / n as f64),
            _ => "-".to_string(),
        };
        let dev = run.log.cpu.map(|c| c.device_s);
        let all = run.log.cpu.map(|c| c.total_s());
        let _ = writeln!(
            out,
            "{:8} {t:9} {:>7} {:>12.0} {:>8} {:>9.3} {:>13} {:>12} {:>13} {:>6}",
            sc.name,
            sc.frame,
            g.frames_per_s(),
            vs_mmio(runs, run),
            g.gbit_per_s(),
            per(dev, g.frames, 1e6),
            per(dev, g.bytes, 1e9),
            per(all, g.frames, 1e6),
            run.log.vcpu_share(),
        );
    }
    let _ = writeln!(
        out,
        "frames/s, Gbit/s: the guest's count of benchmark frames (Ethernet bytes, no virtio-net \
         header) over its own time (TSC); vs mmio: frames/s against the same scenario on \
         virtio-mmio. dev: the CPU time of the VMM's virtio-net thread, VMM: \
         of all its threads (the vCPU thread polls all the time), from the guest's ready line \
         to its figures (/proc/PID/task/*/stat, 10 ms ticks); vCPU: the vCPU thread's CPU time \
         then over that time (much under 100 %: it waited for a CPU, for the benchmark's own sender in \
         rx or a busy host)."
    );
    for run in runs {
        let sc = run.scenario;
        let _ = writeln!(out, "{} on {}:", sc.name, run.transport.name());
        if let Some(ready) = &run.log.ready {
            let _ = writeln!(out, "    {ready}");
        }
        if let (Some(g), Some(cpu)) = (run.guest, run.log.cpu) {
            let _ = writeln!(
                out,
                "    guest: {} frames, {} bytes in {:.3} s; VMM CPU in that window: {:.2} s \
                 device thread, {:.2} s vCPU, {:.2} s other",
                g.frames,
                g.bytes,
                g.ns as f64 / 1e9,
                cpu.device_s,
                cpu.vcpu_s,
                cpu.other_s
            );
        }
        if let (Some(g), Some(t)) = (run.guest, run.tap) {
            match sc.dir {
                Dir::Tx => {
                    let _ = writeln!(
                        out,
                        "    the tap's kernel side got {} frames, {} bytes ({} dropped)",
                        t.rx_packets, t.rx_bytes, t.rx_dropped
                    );
                }
                Dir::Rx => {
                    let _ = writeln!(
                        out,
                        "    guest: {} GSO frames, {} over several buffers, largest {} bytes, {} \
                         other frames, ended by {}",
                        g.gso.unwrap_or(0),
                        g.merged.unwrap_or(0),
                        g.max.unwrap_or(0),
                        g.other.unwrap_or(0),
                        if g.end_marker == Some(true) {
                            "the end marker"
                        } else {
                            "2 s without frames"
                        }
                    );
                    let _ = writeln!(
                        out,
                        "    the tap's kernel side queued {} frames, {} bytes for the VMM and \
                         dropped {} (its queue full)",
                        t.tx_packets, t.tx_bytes, t.tx_dropped
                    );
                }
            }
        }
        if let Some(s) = run.sent {
            let _ = writeln!(
                out,
                "    the benchmark sent {} frames in {:.2} s ({:.0} frames/s, {} failed \
                 sendmmsg calls)",
                s.frames,
                s.seconds,
                s.frames as f64 / s.seconds.max(1e-9),
                s.errors
            );
        }
        if let Some(s) = run.sample {
            if s.frames == 0 {
                let _ = writeln!(out, "    sample at the tap: no benchmark frame captured");
            } else {
                let _ = writeln!(
                    out,
                    "    sample at the tap: {} frames of {}..={} bytes, {} with a GSO header{}",
                    s.frames,
                    s.min_len,
                    s.max_len,
                    s.gso,
                    if s.gso > 0 {
                        format!(" (TCPV4, gso_size {})", s.gso_size)
                    } else {
                        String::new()
                    }
                );
            }
        }
        run.log.write_end(&mut out);
    }
    out
}

/// A run's frames/s against the same scenario's on virtio-mmio ("-" for that one itself).
fn vs_mmio(runs: &[Run], run: &Run) -> String {
    if run.transport == Transport::Mmio {
        return "-".to_string();
    }
    let rate = |r: &Run| {
        r.guest
            .filter(|_| r.log.failure.is_none())
            .map(|g| g.frames_per_s())
    };
    let mmio = runs
        .iter()
        .find(|r| r.scenario == run.scenario && r.transport == Transport::Mmio);
    relative(rate(run), mmio.and_then(rate))
}

// --- main ---------------------------------------------------------------------------------------

fn bench(opts: &Options) -> Result<bool> {
    check_vmm(&opts.run.vmm)?;
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("this benchmark needs root (network namespaces, a TAP interface)".into());
    }
    let temp = TempDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "net-bench")?;
    let kernel = kernel_or_probe(opts.run.kernel.as_deref(), &temp.0, "net bench")?;
    let ns = Netns::create(&format!("cgvm-bench-{}", std::process::id()))?;
    let setup = Setup {
        opts,
        kernel: &kernel,
        ns: &ns,
        ifindex: ns.ifindex()?,
        host: HostState::now(opts.run.pin),
    };
    let runs: Vec<Run> = opts
        .scenarios
        .iter()
        .flat_map(|sc| opts.run.transports.iter().map(move |&t| (*sc, t)))
        .map(|(sc, t)| run_scenario(&setup, sc, t))
        .collect();
    print!("{}", report(&setup, &runs));
    Ok(runs.iter().all(|r| r.log.failure.is_none()))
}

fn main() -> ExitCode {
    let request = parse_args(env::args_os().skip(1));
    common::finish("net bench", USAGE, request, bench)
}
