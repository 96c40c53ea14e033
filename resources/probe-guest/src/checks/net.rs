//! The `net` check: does the virtio-net device (DeviceID 1) carry a frame out and an answer
//! back?
//!
//! The devices are found on the transports `probe.transport` allows (virtio-mmio: the command
//! line and the DSDT, which must agree; virtio-pci: bus 0; see `discovery`); the first
//! virtio-net device is driven (by polling; no interrupts):
//! VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC are required and taken, VIRTIO_NET_F_MRG_RXBUF
//! taken where offered (the 12-byte header of VERSION_1 either way, its num_buffers then
//! checked); the MAC is read from the configuration space. Queue 0 (receive) gets up to 8
//! device-writable buffers of 1536 bytes, queue 1 (transmit) one frame at a time. By
//! `probe.net`:
//!
//! - `arp` (default): a broadcast ARP request from `probe.net_ip` (default 10.0.2.15) for
//!   `probe.net_peer` (default 10.0.2.2); passes on the peer's ARP reply (the host side of a
//!   tap with that address answers);
//! - `dhcp`: a broadcast DHCPDISCOVER with our MAC; passes on a DHCPOFFER for our xid (passt
//!   answers DHCP).
//!
//! The frame is sent again every second while no answer came, for [`TIMEOUT_MS`] in all;
//! unrelated frames (IPv6 router solicitations, ...) are counted and their buffers given back.
//! A frame that claims to be the answer but is broken fails the check (see `net`). The device
//! is reset afterwards.

use core::fmt;

use crate::checks::{self, Context, Report, Via};
use crate::discovery::Found;
use crate::net::{self, Answer, Ip, Mac, Verdict};
use crate::tsc::{self, Deadline};
use crate::virtio::{
    self, DmaBuf, DmaPool, SplitQueue, Transport, VirtioError, DEVICE_ID_NET,
    STATUS_DEVICE_NEEDS_RESET,
};

/// Feature bit 5: the device has a MAC address in its configuration.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature bit 15: the driver can merge receive buffers (num_buffers in the header).
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The virtio-net header with VIRTIO_F_VERSION_1 (num_buffers included either way).
const NET_HDR: usize = 12;
/// Offset of num_buffers in the header.
const NUM_BUFFERS: usize = 10;
/// A receive or transmit buffer: the header and a 1514-byte frame (a VLAN tag too), rounded.
const BUF_LEN: usize = 1536;
/// Receive buffers posted (at most).
const RX_BUFFERS: u16 = 8;
/// Entries of the receive queue at most.
const RX_LIMIT: u16 = 8;
/// Entries of the transmit queue at most.
const TX_LIMIT: u16 = 4;
/// How long to wait for the answer, ms.
pub const TIMEOUT_MS: u64 = 5000;
/// The frame is sent again after this long without an answer, ms.
const RESEND_MS: u64 = 1000;
/// Device status checked every this many idle polls.
const STATUS_POLL_INTERVAL: u32 = 4096;

/// What the check sends and waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// ARP request from `ip` for `peer`.
    Arp { ip: Ip, peer: Ip },
    /// DHCPDISCOVER with transaction id `xid`.
    Dhcp { xid: u32 },
}

/// Runs the net check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let args = ctx.args;
    let ip_arg = |raw: Option<&[u8]>, key: &str, default: Ip, report: &mut Report| match raw {
        None => Some(default),
        Some(raw) => Ip::parse(raw).or_else(|| {
            report.fail(format_args!(
                "probe.{key}={}: expected an IPv4 address (A.B.C.D)",
                crate::text::Escaped(raw)
            ));
            None
        }),
    };
    let ip = ip_arg(args.net_ip, "net_ip", Ip([10, 0, 2, 15]), report);
    let peer = ip_arg(args.net_peer, "net_peer", Ip([10, 0, 2, 2]), report);
    let dhcp = match args.net {
        None | Some(b"arp") => false,
        Some(b"dhcp") => true,
        Some(raw) => {
            return report.fail(format_args!(
                "probe.net={}: expected arp or dhcp",
                crate::text::Escaped(raw)
            ))
        }
    };
    let (Some(ip), Some(peer)) = (ip, peer) else {
        return;
    };
    let mode = if dhcp {
        // Any value will do; the TSC differs from run to run.
        let t = tsc::now();
        Mode::Dhcp {
            xid: (t ^ (t >> 32)) as u32 | 1,
        }
    } else {
        Mode::Arp { ip, peer }
    };
    let Some(devices) = checks::find_devices(ctx, report, DEVICE_ID_NET, "virtio-net") else {
        return;
    };
    let Some(d) = devices.iter().next() else {
        return;
    };
    let label = Label(d);
    let Some((result, irq)) =
        checks::with_transport(d, &label, report, |t, pool| exchange(t, pool, mode))
    else {
        return;
    };
    match result {
        Ok((mac, answer)) => report.detail(format_args!(
            "mac {mac}, {answer}, {}",
            Via { device: d, irq }
        )),
        Err(Problem::Virtio(step, e)) => checks::fail_step(report, &label, step, e),
        Err(p) => report.fail(format_args!("{label}: {p}")),
    }
}

/// How the device is named in problems (by the `netbench` check too): "virtio-net at
/// 0xc0004000", "virtio-net at 00:04.0".
pub struct Label<'a>(pub &'a Found);

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtio-net at {}", self.0.at())
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    /// In the virtio machinery, at a step.
    Virtio(&'static str, VirtioError),
    /// VIRTIO_NET_F_MAC not offered.
    NoMac { offered: u64 },
    /// The configured MAC is zero or multicast.
    BadMac(Mac),
    /// A used receive element names no posted buffer, or has a length outside 12..=1536.
    RxUsed { id: u32, len: u32 },
    /// num_buffers is not 1 for a frame that fits one buffer (with MRG_RXBUF).
    NumBuffers(u16),
    /// A frame claimed to be the answer but is broken.
    Malformed(&'static str),
    /// No answer in time.
    NoReply {
        mode: Mode,
        sent: u32,
        transmitted: u32,
        ignored: u32,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::Virtio(step, e) => write!(f, "{step}: {e}"),
            Problem::NoMac { offered } => write!(
                f,
                "device features 0x{offered:016x} lack VIRTIO_NET_F_MAC (bit 5)"
            ),
            Problem::BadMac(m) => write!(f, "configured MAC {m} is not a unicast address"),
            Problem::RxUsed { id, len } => write!(
                f,
                "receive queue: used element id {id} len {len} (expected a posted buffer and \
                 {NET_HDR}..={BUF_LEN} bytes)"
            ),
            Problem::NumBuffers(n) => write!(
                f,
                "receive header num_buffers {n} for a frame that fits one buffer"
            ),
            Problem::Malformed(why) => write!(f, "malformed reply: {why}"),
            Problem::NoReply {
                mode,
                sent,
                transmitted,
                ignored,
            } => {
                let secs = TIMEOUT_MS / 1000;
                match mode {
                    Mode::Arp { peer, .. } => write!(
                        f,
                        "no ARP reply from {peer} within {secs} s ({sent} requests sent"
                    )?,
                    Mode::Dhcp { xid } => write!(
                        f,
                        "no DHCPOFFER for xid 0x{xid:08x} within {secs} s ({sent} DHCPDISCOVERs \
                         sent"
                    )?,
                }
                if transmitted < sent {
                    write!(f, ", {} never taken by the device", sent - transmitted)?;
                }
                write!(f, ", {ignored} unrelated frames ignored)")
            }
        }
    }
}

/// Reads the 6-byte MAC from the configuration space (offset 0), in one generation.
pub fn read_mac<T: Transport>(t: &T) -> Mac {
    virtio::read_config(t, |t| {
        let mut m = [0u8; 6];
        for (i, b) in m.iter_mut().enumerate() {
            *b = t.config_u8(i);
        }
        Mac(m)
    })
}

/// Initializes the device, sends the frame (again every second) and waits for the answer.
fn exchange<T: Transport>(t: &T, pool: &DmaPool, mode: Mode) -> Result<(Mac, Answer), Problem> {
    let v = |step| move |e| Problem::Virtio(step, e);
    let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
    let (features, offered) =
        virtio::negotiate(t, VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF).map_err(v("init"))?;
    if features & VIRTIO_NET_F_MAC == 0 {
        return Err(Problem::NoMac { offered });
    }
    let mrg = features & VIRTIO_NET_F_MRG_RXBUF != 0;
    let mac = read_mac(t);
    if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
        return Err(Problem::BadMac(mac));
    }
    let rx_ring = virtio::queue_memory(pool, RX_LIMIT).ok_or(no_dma)?;
    let mut rx = virtio::setup_queue(t, 0, RX_LIMIT, rx_ring).map_err(v("queue 0"))?;
    let tx_ring = virtio::queue_memory(pool, TX_LIMIT).ok_or(no_dma)?;
    let mut tx = virtio::setup_queue(t, 1, TX_LIMIT, tx_ring).map_err(v("queue 1"))?;
    virtio::driver_ok(t).map_err(v("init"))?;

    let mut rx_bufs: [Option<DmaBuf<'_>>; RX_BUFFERS as usize] = [None; RX_BUFFERS as usize];
    let posted = rx.size().min(RX_BUFFERS);
    for i in 0..posted {
        let buf = pool.alloc(BUF_LEN, 16).ok_or(no_dma)?;
        rx_bufs[usize::from(i)] = Some(buf);
        give_rx(&mut rx, i, &buf).map_err(v("receive queue"))?;
    }
    if rx.publish(false) {
        t.notify(0);
    }
    let tx_buf = pool.alloc(BUF_LEN, 16).ok_or(no_dma)?;
    let mut frame = [0u8; BUF_LEN];
    let len = match mode {
        Mode::Arp { ip, peer } => net::arp_request(&mut frame, mac, ip, peer),
        Mode::Dhcp { xid } => net::dhcp_discover(&mut frame, mac, xid),
    }
    .ok_or(no_dma)?;
    // The header stays zero: no checksum offload, no GSO, num_buffers 0 on transmit.
    tx_buf.write_bytes(NET_HDR, &frame[..len]);

    let deadline = Deadline::after_ms(TIMEOUT_MS);
    let resend_ticks = tsc::ticks_per_ms().saturating_mul(RESEND_MS);
    let mut sent = 0u32;
    let mut transmitted = 0u32;
    let mut tx_busy = false;
    let mut last_send = 0u64;
    let mut ignored = 0u32;
    // With MRG_RXBUF, used elements still to skip of a frame spread over several buffers.
    let mut skip = 0u16;
    let mut polls = 0u32;
    loop {
        if tx.pop_used().map_err(v("transmit queue"))?.is_some() {
            tx_busy = false;
            transmitted += 1;
        }
        if !tx_busy && (sent == 0 || tsc::now().wrapping_sub(last_send) >= resend_ticks) {
            tx.set_descriptor(0, tx_buf.readable(NET_HDR + len), None);
            tx.offer(0).map_err(v("transmit queue"))?;
            if tx.publish(false) {
                t.notify(1);
            }
            tx_busy = true;
            sent += 1;
            last_send = tsc::now();
        }
        while let Some(used) = rx.pop_used().map_err(v("receive queue"))? {
            let buf = usize::try_from(used.id)
                .ok()
                .and_then(|i| rx_bufs.get(i).copied().flatten())
                .filter(|_| (NET_HDR..=BUF_LEN).contains(&(used.len as usize)))
                .ok_or(Problem::RxUsed {
                    id: used.id,
                    len: used.len,
                })?;
            let verdict = if skip > 0 {
                skip -= 1;
                Verdict::Unrelated
            } else {
                let n = used.len as usize - NET_HDR;
                let num_buffers = buf.read_u16(NUM_BUFFERS);
                if mrg && num_buffers != 1 {
                    if num_buffers == 0 || used.len as usize != BUF_LEN {
                        return Err(Problem::NumBuffers(num_buffers));
                    }
                    // A frame larger than a buffer: not ours; skip its other buffers.
                    skip = num_buffers - 1;
                    Verdict::Unrelated
                } else {
                    buf.read_bytes(NET_HDR, &mut frame[..n]);
                    match mode {
                        Mode::Arp { ip, peer } => net::classify_arp(&frame[..n], mac, ip, peer),
                        Mode::Dhcp { xid } => net::classify_dhcp(&frame[..n], mac, xid),
                    }
                }
            };
            match verdict {
                Verdict::Reply(answer) => return Ok((mac, answer)),
                Verdict::Malformed(why) => return Err(Problem::Malformed(why)),
                Verdict::Unrelated => ignored += 1,
            }
            // used.id < RX_BUFFERS here (it named a buffer).
            give_rx(&mut rx, used.id as u16, &buf).map_err(v("receive queue"))?;
            if rx.publish(false) {
                t.notify(0);
            }
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(STATUS_POLL_INTERVAL) {
            let status = t.status();
            if status & STATUS_DEVICE_NEEDS_RESET != 0 {
                return Err(Problem::Virtio(
                    "waiting for the reply",
                    VirtioError::NeedsReset { status },
                ));
            }
        }
        if deadline.expired() {
            return Err(Problem::NoReply {
                mode,
                sent,
                transmitted,
                ignored,
            });
        }
        core::hint::spin_loop();
    }
}

/// Offers receive buffer `i` (descriptor `i`, device-writable) on the receive queue.
fn give_rx(rx: &mut SplitQueue<'_>, i: u16, buf: &DmaBuf<'_>) -> Result<(), VirtioError> {
    rx.set_descriptor(i, buf.writable(BUF_LEN), None);
    rx.offer(i)
}
