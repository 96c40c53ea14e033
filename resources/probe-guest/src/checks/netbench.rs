//! The `netbench` check: how many frames does the virtio-net device (DeviceID 1) carry, and
//! how many bytes, with the guest never the bottleneck?
//!
//! A benchmark, not a verification: it drives the first virtio-net device by polling (no
//! interrupts: used_event kept out of reach with VIRTIO_F_EVENT_IDX, else NO_INTERRUPT), its
//! buffers in the large DMA arena ([`DmaPool::take_large`]), and prints what it measured. By
//! `probe.netbench`:
//!
//! - `tx` (default): sends benchmark frames (`net::bench`: Ethernet, IPv4, TCP to port 5201,
//!   from our MAC to [`SINK_MAC`], which no host interface has) of `probe.netbench_frame`
//!   bytes (default 1514, 60..=1514) for `probe.netbench_ms` (default 2000). With
//!   `probe.netbench_tso=1` the frames are TSO frames of [`TSO_FRAME_LEN`] bytes (45 segments
//!   of 1448 bytes) behind a virtio-net header with gso_type TCPV4, gso_size 1448 and
//!   NEEDS_CSUM (the TCP checksum field holding the pseudo-header sum): VIRTIO_NET_F_CSUM and
//!   HOST_TSO4 must be offered. The transmit queue (up to 256 entries) is kept full: every
//!   chain is one device-readable descriptor over a copy of the frame (one copy a chain, as
//!   many as fit in 8 MiB: 128 TSO frames), and goes straight back while
//!   the time lasts; the avail index is published once per batch and QueueNotify written only
//!   when the device asks. `frames` counts the chains the device used.
//! - `rx`: posts receive buffers (1536 bytes each, up to 256; with `probe.netbench_tso=1`
//!   VIRTIO_NET_F_GUEST_CSUM and GUEST_TSO4 are taken, which must be offered, and the buffers
//!   are 65600 bytes, up to 127, each able to hold a 64 KiB frame), VIRTIO_NET_F_MRG_RXBUF
//!   taken where offered (a frame then may span buffers; num_buffers is followed). It prints
//!   `probe: netbench ready rx` and waits up to 30 s for the first benchmark frame, then counts
//!   frames and bytes until the end marker (EtherType 0x88b5, "cgvm-netbench-end") or 2 s
//!   without a benchmark frame; every buffer goes straight back. Frames of other kinds (the
//!   host's own traffic) are counted apart. `gso` counts benchmark frames whose header
//!   announced GSO (a TSO frame that arrived whole), `merged` those over several buffers.
//!
//! Lines, for tools (`ns` from the TSC at the rate `tsc` found): before the timed part,
//! `probe: netbench ready tx|rx (...)`; after it, `probe: netbench tx frames=N bytes=B ns=T
//! frame=F tso=0|1 notifies=K` (ns: first submission to last completion) or `probe: netbench
//! rx frames=N bytes=B ns=T gso=G merged=M max=X other=O end=marker|idle buffers=K
//! buffer=S` (ns: first benchmark frame to last). The device is reset afterwards.

use core::fmt;

use crate::checks::net::{read_mac, Label};
use crate::checks::{self, Context, Report};
use crate::net::bench::{
    self, Endpoints, Kind, RxTally, TallyError, VnetHdr, DEFAULT_MAC, GUEST_IP, HEADERS_LEN,
    HOST_IP, MAX_FRAME, MIN_FRAME, SINK_MAC, TSO_FRAME_LEN, TSO_MSS, VNET_HDR_LEN,
};
use crate::net::Mac;
use crate::text::Escaped;
use crate::tsc;
use crate::virtio::{
    self, DmaPool, Segment, SplitQueue, Transport, VirtioError, DEVICE_ID_NET,
    STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_EVENT_IDX,
};

/// Feature bit 0: the device completes partial checksums.
const F_CSUM: u64 = 1 << 0;
/// Feature bit 1: the driver takes frames with partial checksums.
const F_GUEST_CSUM: u64 = 1 << 1;
/// Feature bit 5: the device has a MAC address in its configuration.
const F_MAC: u64 = 1 << 5;
/// Feature bit 7: the driver takes TSOv4 frames.
const F_GUEST_TSO4: u64 = 1 << 7;
/// Feature bit 11: the device takes TSOv4 frames.
const F_HOST_TSO4: u64 = 1 << 11;
/// Feature bit 15: the driver can merge receive buffers.
const F_MRG_RXBUF: u64 = 1 << 15;

/// Default sending time, ms.
const DEFAULT_MS: u64 = 2000;
/// Entries of the busy queue at most.
const QUEUE_LIMIT: u16 = 256;
/// Entries of the idle queue (it must exist for the device to start).
const IDLE_LIMIT: u16 = 4;
/// Receive buffer without TSO: the header and a 1514-byte frame, with room for a VLAN tag.
const RX_BUF_SMALL: usize = 1536;
/// Receive buffer with TSO: the header and a 64 KiB frame with a VLAN tag (65565), rounded.
const RX_BUF_TSO: usize = 65600;
/// Bytes of receive buffers at most (the large arena less room for the queues).
const RX_BYTES: usize = 8 << 20;
/// Bytes of transmit frame copies at most.
const TX_BYTES: usize = 8 << 20;
/// How long the receive side waits for the first benchmark frame, ms.
const RX_START_MS: u64 = 30_000;
/// The receive side ends after this long without a benchmark frame, ms.
const RX_IDLE_MS: u64 = 2000;
/// How long the device may go without using a chain while the guest sends, ms.
const STALL_MS: u64 = 2000;
/// Nothing happened for this long (ms): look at the device status (DEVICE_NEEDS_RESET).
const STATUS_LOOK_MS: u64 = 100;
/// Bytes of a received frame read to classify it.
const HEAD_LEN: usize = 64;

/// The direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

/// The check's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    dir: Dir,
    /// Frame length (tx).
    frame: usize,
    tso: bool,
    ms: u64,
}

impl Params {
    /// From the command line; problems reported, `None` then.
    fn from_args(ctx: &Context<'_>, report: &mut Report) -> Option<Self> {
        let a = ctx.args;
        let dir = match a.netbench {
            None | Some(b"tx") => Dir::Tx,
            Some(b"rx") => Dir::Rx,
            Some(raw) => {
                report.fail(format_args!(
                    "probe.netbench={}: expected tx or rx",
                    Escaped(raw)
                ));
                return None;
            }
        };
        let bad = |report: &mut Report, key: &str, raw: &dyn fmt::Display, want: &str| {
            report.fail(format_args!("probe.{key}={raw}: expected {want}"));
        };
        let frame = match a.netbench_frame {
            None => MAX_FRAME,
            Some(Ok(n)) if (MIN_FRAME as u64..=MAX_FRAME as u64).contains(&n) => n as usize,
            Some(Ok(n)) => {
                bad(report, "netbench_frame", &n, "60..=1514 (bytes)");
                return None;
            }
            Some(Err(raw)) => {
                bad(report, "netbench_frame", &Escaped(raw), "60..=1514 (bytes)");
                return None;
            }
        };
        let tso = match a.netbench_tso {
            None | Some(Ok(0)) => false,
            Some(Ok(1)) => true,
            Some(Ok(n)) => {
                bad(report, "netbench_tso", &n, "0 or 1");
                return None;
            }
            Some(Err(raw)) => {
                bad(report, "netbench_tso", &Escaped(raw), "0 or 1");
                return None;
            }
        };
        let ms = match a.netbench_ms {
            None => DEFAULT_MS,
            Some(Ok(n)) if n > 0 => n,
            Some(Ok(n)) => {
                bad(report, "netbench_ms", &n, "a number of ms from 1");
                return None;
            }
            Some(Err(raw)) => {
                bad(
                    report,
                    "netbench_ms",
                    &Escaped(raw),
                    "a number of ms from 1",
                );
                return None;
            }
        };
        Some(Self {
            dir,
            frame: if tso { TSO_FRAME_LEN } else { frame },
            tso,
            ms,
        })
    }
}

/// Runs the netbench check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let Some(params) = Params::from_args(ctx, report) else {
        return;
    };
    let Some(devices) = checks::find_devices(ctx, report, DEVICE_ID_NET, "virtio-net") else {
        return;
    };
    let Some(d) = devices.iter().next() else {
        return;
    };
    let label = Label(d);
    // Interrupts are suppressed in the benchmark: the MSI-X verdict proves nothing here.
    let Some((result, _)) =
        checks::with_transport_large(d, &label, report, |t, pool| match params.dir {
            Dir::Tx => transmit(t, pool, &params),
            Dir::Rx => receive(t, pool, &params),
        })
    else {
        return;
    };
    match result {
        Ok(summary) => report.detail(format_args!("{label}, {summary}")),
        Err(Problem::Virtio(step, e)) => checks::fail_step(report, &label, step, e),
        Err(p) => report.fail(format_args!("{label}: {p}")),
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    /// In the virtio machinery, at a step.
    Virtio(&'static str, VirtioError),
    /// TSO asked for, the features it needs not offered.
    NoTso { need: &'static str, offered: u64 },
    /// A used element names no chain of ours, or has a length past its buffer.
    Used {
        queue: &'static str,
        id: u32,
        len: u32,
    },
    /// A received buffer could not be counted.
    Tally(TallyError),
    /// No benchmark frame arrived in time.
    NoFrames { other: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Virtio(step, e) => write!(f, "{step}: {e}"),
            Self::NoTso { need, offered } => write!(
                f,
                "probe.netbench_tso=1 needs {need}; the device offers 0x{offered:016x}"
            ),
            Self::Used { queue, id, len } => write!(
                f,
                "{queue} queue: used element id {id} len {len} names no buffer of ours or \
                 passes its end"
            ),
            Self::Tally(TallyError::Short(len)) => write!(
                f,
                "receive buffer used for {len} bytes, less than the {VNET_HDR_LEN}-byte header"
            ),
            Self::Tally(TallyError::NumBuffers(n)) => {
                write!(f, "receive header num_buffers is {n}")
            }
            Self::NoFrames { other } => write!(
                f,
                "no benchmark frame within {} s ({other} other frames)",
                RX_START_MS / 1000
            ),
        }
    }
}

fn at(step: &'static str) -> impl Fn(VirtioError) -> Problem {
    move |e| Problem::Virtio(step, e)
}

/// The named features of interest, for the ready line.
struct Features(u64);

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (F_CSUM, "csum"),
            (F_GUEST_CSUM, "guest_csum"),
            (F_MAC, "mac"),
            (F_GUEST_TSO4, "guest_tso4"),
            (F_HOST_TSO4, "host_tso4"),
            (F_MRG_RXBUF, "mrg_rxbuf"),
            (VIRTIO_F_EVENT_IDX, "event_idx"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if first { "" } else { "," })?;
                first = false;
            }
        }
        if first {
            write!(f, "none")?;
        }
        Ok(())
    }
}

/// What the check says on its ok line.
struct Summary {
    mac: Mac,
    features: u64,
    dir: Dir,
    frames: u64,
    bytes: u64,
    ns: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = u128::from(self.ns.max(1));
        let fps = u128::from(self.frames) * 1_000_000_000 / ns;
        let mbit = u128::from(self.bytes) * 8 * 1000 / ns;
        write!(
            f,
            "mac {}, features {}, {} {} frames/s {}.{:03} Gbit/s",
            self.mac,
            Features(self.features),
            match self.dir {
                Dir::Tx => "tx",
                Dir::Rx => "rx",
            },
            fps,
            mbit / 1000,
            mbit % 1000
        )
    }
}

/// The device started: features, MAC, the two queues.
struct Started<'p> {
    features: u64,
    mac: Mac,
    rx: SplitQueue<'p>,
    tx: SplitQueue<'p>,
}

/// Negotiates `wanted` (and VERSION_1), reads the MAC, sets up the receive queue (`rx_limit`
/// entries at most) and the transmit queue, DRIVER_OK.
fn start<'p, T: Transport>(
    t: &T,
    pool: &'p DmaPool,
    wanted: u64,
    rx_limit: u16,
    tx_limit: u16,
) -> Result<Started<'p>, Problem> {
    let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
    let (features, _) = virtio::negotiate(t, wanted).map_err(at("init"))?;
    let mac = if features & F_MAC != 0 {
        read_mac(t)
    } else {
        DEFAULT_MAC
    };
    let rx_ring = virtio::queue_memory(pool, rx_limit).ok_or(no_dma)?;
    let rx = virtio::setup_queue(t, 0, rx_limit, rx_ring).map_err(at("queue 0"))?;
    let tx_ring = virtio::queue_memory(pool, tx_limit).ok_or(no_dma)?;
    let tx = virtio::setup_queue(t, 1, tx_limit, tx_ring).map_err(at("queue 1"))?;
    virtio::driver_ok(t).map_err(at("init"))?;
    Ok(Started {
        features,
        mac,
        rx,
        tx,
    })
}

/// Watches a polling loop for a device that stopped answering: the status is looked at after
/// [`STATUS_LOOK_MS`] without progress (DEVICE_NEEDS_RESET fails), and `limit_ms` without
/// progress is a timeout.
struct Watch {
    ticks_per_ms: u64,
    last_progress: u64,
    last_look: u64,
}

impl Watch {
    fn new(ticks_per_ms: u64, now: u64) -> Self {
        Self {
            ticks_per_ms,
            last_progress: now,
            last_look: now,
        }
    }

    fn progress(&mut self, now: u64) {
        self.last_progress = now;
    }

    /// Ms since the last progress.
    fn idle_ms(&self, now: u64) -> u64 {
        now.wrapping_sub(self.last_progress) / self.ticks_per_ms.max(1)
    }

    /// Nothing new at `now`: looks at the device now and then. `Ok(true)` when it just looked
    /// (every [`STATUS_LOOK_MS`] without progress); `Err` for DEVICE_NEEDS_RESET.
    fn idle<T: Transport>(&mut self, t: &T, now: u64, step: &'static str) -> Result<bool, Problem> {
        let look = self.ticks_per_ms.saturating_mul(STATUS_LOOK_MS);
        if now.wrapping_sub(self.last_progress) < look || now.wrapping_sub(self.last_look) < look {
            return Ok(false);
        }
        self.last_look = now;
        let status = t.status();
        if status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err(Problem::Virtio(step, VirtioError::NeedsReset { status }));
        }
        Ok(true)
    }
}

/// The `tx` direction: keeps the transmit queue full of frames for `p.ms`.
fn transmit<T: Transport>(t: &T, pool: &DmaPool, p: &Params) -> Result<Summary, Problem> {
    let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
    let tso_features = F_CSUM | F_HOST_TSO4;
    let wanted = F_MAC | VIRTIO_F_EVENT_IDX | if p.tso { tso_features } else { 0 };
    let mut s = start(t, pool, wanted, IDLE_LIMIT, QUEUE_LIMIT)?;
    if p.tso && s.features & tso_features != tso_features {
        return Err(Problem::NoTso {
            need: "VIRTIO_NET_F_CSUM and HOST_TSO4",
            offered: t.device_features(),
        });
    }
    let event_idx = s.features & VIRTIO_F_EVENT_IDX != 0;

    // The frame behind its header, in as many copies as there are chains (or as fit in
    // TX_BYTES): chain i sends copy i % copies, so that the device reads from many places,
    // as it would from a real driver, and not from one cache-hot buffer.
    let chain_len = VNET_HDR_LEN + p.frame;
    let stride = chain_len.next_multiple_of(64);
    let size = s.tx.size();
    let copies = usize::from(size).min(TX_BYTES / stride).max(1);
    let buf = pool.alloc(stride * copies, 64).ok_or(no_dma)?;
    let hdr = if p.tso {
        bench::tso_header(TSO_MSS)
    } else {
        VnetHdr::default()
    };
    buf.write_bytes(0, &hdr.encode());
    let endpoints = Endpoints {
        src_mac: s.mac,
        dst_mac: SINK_MAC,
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
    };
    let mut headers = [0u8; HEADERS_LEN];
    bench::frame_headers(&mut headers, p.frame, &endpoints, 1, p.tso).ok_or(no_dma)?;
    buf.write_bytes(VNET_HDR_LEN, &headers);
    for i in 0..p.frame - HEADERS_LEN {
        buf.write_u8(VNET_HDR_LEN + HEADERS_LEN + i, bench::payload_byte(i));
    }
    for c in 1..copies {
        for w in 0..stride / 8 {
            buf.write_u64(c * stride + 8 * w, buf.read_u64(8 * w));
        }
    }
    for i in 0..size {
        let seg = Segment {
            addr: buf.addr() + (usize::from(i) % copies * stride) as u64,
            len: chain_len as u32,
            device_writes: false,
        };
        s.tx.set_descriptor(i, seg, None);
    }
    s.tx.suppress_interrupts(event_idx);
    s.rx.suppress_interrupts(event_idx);

    let ticks_per_ms = tsc::ticks_per_ms();
    crate::println!(
        "probe: netbench ready tx (mac {}, features {}, queue {size}, frame {} bytes in {copies} \
         copies{})",
        s.mac,
        Features(s.features),
        p.frame,
        if p.tso { ", tso gso_size 1448" } else { "" }
    );
    let duration = ticks_per_ms.saturating_mul(p.ms);
    // Read before the chains go out: the device may use them all before the next look.
    let mut seen = s.tx.used_index();
    let start_tsc = tsc::now();
    let mut watch = Watch::new(ticks_per_ms, start_tsc);
    for i in 0..size {
        s.tx.offer(i).map_err(at("transmit queue"))?;
    }
    let mut notifies = 0u64;
    if s.tx.publish(event_idx) {
        t.notify(1);
        notifies += 1;
    }
    let mut frames = 0u64;
    let mut stopping = false;
    let end = loop {
        let idx = s.tx.used_index();
        let now = tsc::now();
        if idx == seen {
            watch.idle(t, now, "transmit queue")?;
            if watch.idle_ms(now) >= STALL_MS {
                return Err(Problem::Virtio(
                    "transmit queue",
                    VirtioError::Timeout { ms: STALL_MS },
                ));
            }
            core::hint::spin_loop();
            continue;
        }
        seen = idx;
        watch.progress(now);
        stopping |= now.wrapping_sub(start_tsc) >= duration;
        while let Some(used) = s.tx.pop_used_before(idx).map_err(at("transmit queue"))? {
            if used.id >= u32::from(size) {
                return Err(Problem::Used {
                    queue: "transmit",
                    id: used.id,
                    len: used.len,
                });
            }
            frames += 1;
            if !stopping {
                s.tx.offer(used.id as u16).map_err(at("transmit queue"))?;
            }
        }
        s.tx.suppress_interrupts(event_idx);
        if s.tx.publish(event_idx) {
            t.notify(1);
            notifies += 1;
        }
        if stopping && s.tx.in_flight() == 0 {
            break tsc::now();
        }
    };
    let ns = tsc::ticks_to_ns_at(end.wrapping_sub(start_tsc), ticks_per_ms);
    let bytes = frames * p.frame as u64;
    crate::println!(
        "probe: netbench tx frames={frames} bytes={bytes} ns={ns} frame={} tso={} \
         notifies={notifies}",
        p.frame,
        u8::from(p.tso)
    );
    Ok(Summary {
        mac: s.mac,
        features: s.features,
        dir: Dir::Tx,
        frames,
        bytes,
        ns,
    })
}

/// How the receive side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Marker,
    Idle,
}

/// The `rx` direction: keeps receive buffers posted and counts what arrives.
fn receive<T: Transport>(t: &T, pool: &DmaPool, p: &Params) -> Result<Summary, Problem> {
    let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
    let tso_features = F_GUEST_CSUM | F_GUEST_TSO4;
    let wanted = F_MAC | F_MRG_RXBUF | VIRTIO_F_EVENT_IDX | if p.tso { tso_features } else { 0 };
    let mut s = start(t, pool, wanted, QUEUE_LIMIT, IDLE_LIMIT)?;
    if p.tso && s.features & tso_features != tso_features {
        return Err(Problem::NoTso {
            need: "VIRTIO_NET_F_GUEST_CSUM and GUEST_TSO4",
            offered: t.device_features(),
        });
    }
    let event_idx = s.features & VIRTIO_F_EVENT_IDX != 0;
    let mergeable = s.features & F_MRG_RXBUF != 0;
    let buf_len = if p.tso { RX_BUF_TSO } else { RX_BUF_SMALL };
    let count = usize::from(s.rx.size()).min(RX_BYTES / buf_len);
    let bufs = pool.alloc(count * buf_len, 64).ok_or(no_dma)?;
    let segment = |i: usize| Segment {
        addr: bufs.addr() + (i * buf_len) as u64,
        len: buf_len as u32,
        device_writes: true,
    };
    // Read before the buffers go out: the device may fill them before the next look.
    let mut seen = s.rx.used_index();
    for i in 0..count {
        s.rx.set_descriptor(i as u16, segment(i), None);
        s.rx.offer(i as u16).map_err(at("receive queue"))?;
    }
    s.rx.suppress_interrupts(event_idx);
    s.tx.suppress_interrupts(event_idx);
    if s.rx.publish(event_idx) {
        t.notify(0);
    }

    let ticks_per_ms = tsc::ticks_per_ms();
    crate::println!(
        "probe: netbench ready rx (mac {}, features {}, {count} buffers of {buf_len} bytes)",
        s.mac,
        Features(s.features)
    );
    let mut tally = RxTally::new(mergeable);
    let mut first: Option<u64> = None;
    let mut last = 0u64;
    let mut watch = Watch::new(ticks_per_ms, tsc::now());
    let mut head = [0u8; VNET_HDR_LEN + HEAD_LEN];
    let end = 'poll: loop {
        let idx = s.rx.used_index();
        let now = tsc::now();
        if idx == seen {
            watch.idle(t, now, "receive queue")?;
            match first {
                None if watch.idle_ms(now) >= RX_START_MS => {
                    return Err(Problem::NoFrames { other: tally.other });
                }
                Some(_) if now.wrapping_sub(last) >= ticks_per_ms.saturating_mul(RX_IDLE_MS) => {
                    break End::Idle;
                }
                _ => {}
            }
            core::hint::spin_loop();
            continue;
        }
        seen = idx;
        watch.progress(now);
        let mut ended = false;
        while let Some(used) = s.rx.pop_used_before(idx).map_err(at("receive queue"))? {
            let i = used.id as usize;
            if i >= count || used.len as usize > buf_len {
                return Err(Problem::Used {
                    queue: "receive",
                    id: used.id,
                    len: used.len,
                });
            }
            let done = if tally.in_frame() {
                tally.more(used.len)
            } else {
                let n = (used.len as usize).min(head.len());
                let at = i * buf_len;
                bufs.read_bytes(at, &mut head[..n]);
                let hdr = VnetHdr::decode(&head[..n]).unwrap_or_default();
                let kind = bench::classify(head.get(VNET_HDR_LEN..n).unwrap_or_default());
                tally.first(&hdr, kind, used.len).map_err(Problem::Tally)?
            };
            match done {
                Some(Kind::Bench) => {
                    first.get_or_insert(now);
                    last = now;
                }
                Some(Kind::End) => ended = true,
                Some(Kind::Other) | None => {}
            }
            s.rx.set_descriptor(i as u16, segment(i), None);
            s.rx.offer(i as u16).map_err(at("receive queue"))?;
        }
        s.rx.suppress_interrupts(event_idx);
        if s.rx.publish(event_idx) {
            t.notify(0);
        }
        if ended {
            break 'poll End::Marker;
        }
    };
    let ns = first.map_or(0, |f| {
        tsc::ticks_to_ns_at(last.wrapping_sub(f), ticks_per_ms)
    });
    crate::println!(
        "probe: netbench rx frames={} bytes={} ns={ns} gso={} merged={} max={} other={} end={} \
         buffers={count} buffer={buf_len}",
        tally.frames,
        tally.bytes,
        tally.gso,
        tally.merged,
        tally.max_frame,
        tally.other,
        match end {
            End::Marker => "marker",
            End::Idle => "idle",
        }
    );
    Ok(Summary {
        mac: s.mac,
        features: s.features,
        dir: Dir::Rx,
        frames: tally.frames,
        bytes: tally.bytes,
        ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn feature_names_and_summary() {
        assert_eq!(Features(0).to_string(), "none");
        assert_eq!(
            Features(F_CSUM | F_HOST_TSO4 | VIRTIO_F_EVENT_IDX).to_string(),
            "csum,host_tso4,event_idx"
        );
        let s = Summary {
            mac: DEFAULT_MAC,
            features: F_MAC,
            dir: Dir::Rx,
            frames: 1000,
            bytes: 1000 * 1514,
            ns: 2_000_000,
        };
        assert_eq!(
            s.to_string(),
            "mac 02:00:00:00:00:0f, features mac, rx 500000 frames/s 6.056 Gbit/s"
        );
    }

    #[test]
    fn receive_buffers_fit_the_arena_and_frames() {
        assert!(RX_BUF_SMALL >= VNET_HDR_LEN + MAX_FRAME + 4);
        assert!(RX_BUF_TSO >= VNET_HDR_LEN + 65535 + 18);
        assert_eq!(RX_BYTES / RX_BUF_TSO, 127);
        assert!(RX_BYTES + 2 * 8192 <= virtio::LARGE_DMA_ARENA_SIZE);
        // 128 copies of a TSO frame would pass TX_BYTES: as many as fit.
        let stride = (VNET_HDR_LEN + TSO_FRAME_LEN).next_multiple_of(64);
        assert_eq!(TX_BYTES / stride, 128);
        assert!(128 * stride + 2 * 8192 <= virtio::LARGE_DMA_ARENA_SIZE);
    }
}
