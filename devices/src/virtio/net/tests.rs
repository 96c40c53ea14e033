//! Tests of the network device through its queues: a driver written here posts descriptor
//! chains into guest memory, the worker moves frames between them and a real TAP interface
//! in a private network namespace, and a packet socket on that interface plays the host.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::testing::{can_create_taps, create_tap, in_new_netns, test_frame, PacketSocket};
use super::*;
use crate::rate_limiter::TokenBucket;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, DeviceHealth, InterruptReason, VirtioInterrupt};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: u64 = 16 << 20;
const QSIZE: u16 = 64;
const RX_TOKEN: u32 = 0;
const TX_TOKEN: u32 = 1;
const TAP_TOKEN: u32 = 2;

#[derive(Default)]
struct CountingInterrupt {
    queue: AtomicU32,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        if let InterruptReason::Queue(_) = reason {
            self.queue.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// The driver side of one queue whose descriptor table, available and used rings start at
/// `base`, `base + 0x1000` and `base + 0x2000`; buffers come from a heap shared by both
/// queues (`heap` is the next free address).
struct Driver {
    mem: GuestMemoryMmap,
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// One descriptor: address, length, device-writable.
type Desc = (GuestAddress, u32, bool);

impl Driver {
    fn new(mem: &GuestMemoryMmap, base: u64) -> (Self, Queue) {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let d = Driver {
            mem: mem.clone(),
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (d, q)
    }

    fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.0.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&((idx + 1) % QSIZE).to_le_bytes());
            self.mem
                .write_slice(&b, GuestAddress(self.base + u64::from(idx) * 16))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = self.avail_idx % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(self.base + 0x1004 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.base + 0x1002))
            .unwrap();
        head
    }

    /// The used entries added since the last call: (id, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let used = GuestAddress(self.base + 0x2000);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = used.unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
            out.push((
                self.mem.read_obj(e).unwrap(),
                self.mem.read_obj(e.unchecked_add(4)).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A worker over the tap `name` with its two drivers, and where the buffers go.
struct Rig {
    mem: GuestMemoryMmap,
    rx: Driver,
    tx: Driver,
    worker: NetWorker,
    metrics: Arc<NetMetrics>,
    intr: Arc<CountingInterrupt>,
    heap: u64,
}

impl Rig {
    fn new(
        name: &str,
        mergeable: bool,
        rx_limit: Option<RateLimiter>,
        tx_limit: Option<RateLimiter>,
    ) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (rx, rxq) = Driver::new(&mem, 0);
        let (tx, txq) = Driver::new(&mem, 0x4000);
        let tap = Arc::new(Tap::open(name).unwrap());
        let metrics = Arc::new(NetMetrics::default());
        let intr = Arc::new(CountingInterrupt::default());
        let q = |index, queue| ActiveQueue {
            index,
            queue,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let worker = NetWorker::new(
            mem.clone(),
            q(RX_QUEUE, rxq),
            q(TX_QUEUE, txq),
            tap,
            intr.clone(),
            rx_limit,
            tx_limit,
            mergeable,
            metrics.clone(),
        );
        Rig {
            mem,
            rx,
            tx,
            worker,
            metrics,
            intr,
            heap: 0x10_0000,
        }
    }

    fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 4095) & !4095;
        assert!(self.heap < MEM_SIZE);
        GuestAddress(a)
    }

    /// Posts a receive chain of one buffer of `len` bytes; returns its head and address.
    fn post_rx(&mut self, len: u32) -> (u16, GuestAddress) {
        let a = self.alloc(u64::from(len));
        (self.rx.add_chain(&[(a, len, true)]), a)
    }

    /// Posts `frame` for transmission behind a zero header split over two descriptors.
    fn post_tx(&mut self, frame: &[u8]) -> u16 {
        let h = self.alloc(12);
        self.mem.write_slice(&[0u8; 12], h).unwrap();
        let d = self.alloc(frame.len() as u64);
        self.mem.write_slice(frame, d).unwrap();
        self.tx.add_chain(&[
            (h, 5, false),
            (h.unchecked_add(5), 7, false),
            (d, frame.len() as u32, false),
        ])
    }

    fn handle(&mut self, token: u32) {
        self.worker.handle(token, &Sources::detached()).unwrap();
    }

    fn bytes(&self, a: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, a).unwrap();
        v
    }

    fn m(&self, c: &AtomicU64) -> u64 {
        let _ = self;
        c.load(Ordering::Relaxed)
    }
}

/// Waits until the tap has something to read.
fn wait_readable(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own.
    let r = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(r, 1, "the tap became readable");
}

/// Runs `body` with a fresh tap in a private namespace (skipped when not root).
fn with_tap(test: &'static str, body: impl FnOnce(&str) + Send + 'static) {
    if !can_create_taps(test) {
        return;
    }
    in_new_netns(move || {
        create_tap("cgvmnet0");
        body("cgvmnet0");
    });
}

fn header_num_buffers(h: &[u8]) -> u16 {
    u16::from_le_bytes([h[10], h[11]])
}

#[test]
fn the_device_offers_documented_features_and_config() {
    with_tap("the_device_offers_documented_features_and_config", |name| {
        let mac = [0x02, 0xcc, 0, 0, 0, 7];
        let dev = Net::new(NetConfig {
            tap: name.into(),
            mac: Some(mac),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dev.device_type(), crate::virtio::TYPE_NET);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let f = dev.features();
        for bit in [
            crate::virtio::VIRTIO_F_VERSION_1,
            crate::virtio::VIRTIO_RING_F_EVENT_IDX,
            features::MAC,
            features::STATUS,
            features::MRG_RXBUF,
            features::CSUM,
            features::GUEST_CSUM,
            features::GUEST_TSO4,
            features::HOST_TSO4,
        ] {
            assert!(f & (1 << bit) != 0, "feature {bit}");
        }
        let mut c = [0u8; 10];
        dev.read_config(0, &mut c);
        assert_eq!(&c[..6], &mac);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), STATUS_LINK_UP);
        assert_eq!(&c[8..], &[0, 0], "nothing past the status");
        // The tap is held: a second device on it is refused, naming it.
        let e = Net::new(NetConfig {
            tap: name.into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
        drop(dev);
        // Without a MAC address, no MAC feature.
        let dev = Net::new(NetConfig {
            tap: name.into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dev.features() & (1 << features::MAC), 0);
        // Offloads follow the guest's features.
        assert_eq!(offloads_for(0), 0);
        assert_eq!(offloads_for(1 << features::GUEST_TSO4), 0);
        assert_eq!(
            offloads_for((1 << features::GUEST_CSUM) | (1 << features::GUEST_TSO6)),
            TUN_F_CSUM | TUN_F_TSO6
        );
    });
    let e = Net::new(NetConfig {
        tap: "a-name-too-long-for-linux".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("a-name-too-long-for-linux"));
}

#[test]
fn a_frame_spans_mergeable_buffers_with_num_buffers_set() {
    with_tap(
        "a_frame_spans_mergeable_buffers_with_num_buffers_set",
        |name| {
            let mut rig = Rig::new(name, true, None, None);
            let sock = PacketSocket::bind(name);
            let bufs: Vec<_> = (0..4).map(|_| rig.post_rx(1000)).collect();
            let frame = test_frame(3, 2500);
            sock.send(&frame);
            wait_readable(rig.worker_tap_fd());
            rig.handle(TAP_TOKEN);
            let used = rig.rx.take_used();
            let total = 12 + frame.len();
            assert_eq!(
                used,
                vec![
                    (u32::from(bufs[0].0), 1000),
                    (u32::from(bufs[1].0), 1000),
                    (u32::from(bufs[2].0), (total - 2000) as u32)
                ]
            );
            let mut got = Vec::new();
            for (i, &(_, len)) in used.iter().enumerate() {
                got.extend(rig.bytes(bufs[i].1, len as usize));
            }
            assert_eq!(header_num_buffers(&got), 3);
            assert_eq!(&got[12..], &frame[..]);
            assert_eq!(rig.m(&rig.metrics.rx_frames), 1);
            assert_eq!(rig.m(&rig.metrics.rx_bytes), frame.len() as u64);
            assert!(rig.intr.queue.load(Ordering::SeqCst) >= 1);
            assert!(rig.worker.is_reading_tap());
        },
    );
}

impl Rig {
    fn worker_tap_fd(&self) -> i32 {
        let s = self.worker.sources();
        s.iter()
            .find(|&&(_, t)| t == TAP_TOKEN)
            .map(|&(fd, _)| fd)
            .expect("the tap is a source")
    }
}

#[test]
fn without_buffers_a_frame_waits_and_goes_on_the_rx_notification() {
    with_tap(
        "without_buffers_a_frame_waits_and_goes_on_the_rx_notification",
        |name| {
            let mut rig = Rig::new(name, true, None, None);
            let tap_fd = rig.worker_tap_fd();
            let sock = PacketSocket::bind(name);
            let first = test_frame(1, 1500);
            let second = test_frame(2, 600);
            sock.send(&first);
            sock.send(&second);
            wait_readable(tap_fd);
            rig.handle(TAP_TOKEN);
            // No buffers: the frame waits, the tap is no longer a source, nothing is lost.
            assert!(rig.worker.has_pending_frame());
            assert!(!rig.worker.is_reading_tap());
            assert!(rig.worker.sources().iter().all(|&(_, t)| t != TAP_TOKEN));
            assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
            // A buffer too small for it (mergeable: more may come): still waits.
            let (h1, a1) = rig.post_rx(1000);
            rig.handle(RX_TOKEN);
            assert!(rig.rx.take_used().is_empty());
            assert!(rig.worker.has_pending_frame());
            // Enough room: both frames are delivered, in order, and the tap is back.
            let (h2, a2) = rig.post_rx(2048);
            let (h3, a3) = rig.post_rx(2048);
            rig.handle(RX_TOKEN);
            let used = rig.rx.take_used();
            assert_eq!(used[0], (u32::from(h1), 1000));
            assert_eq!(used[1], (u32::from(h2), 512));
            assert_eq!(used[2], (u32::from(h3), 612));
            let mut f1 = rig.bytes(a1, 1000);
            f1.extend(rig.bytes(a2, 512));
            assert_eq!(header_num_buffers(&f1), 2);
            assert_eq!(&f1[12..], &first[..]);
            let f2 = rig.bytes(a3, 612);
            assert_eq!(header_num_buffers(&f2), 1);
            assert_eq!(&f2[12..], &second[..]);
            assert!(rig.worker.is_reading_tap());
            assert!(!rig.worker.has_pending_frame());
            assert_eq!(rig.m(&rig.metrics.rx_frames), 2);
            assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
        },
    );
}

#[test]
fn malformed_rx_chains_cost_one_frame_each() {
    with_tap("malformed_rx_chains_cost_one_frame_each", |name| {
        let mut rig = Rig::new(name, false, None, None);
        let sock = PacketSocket::bind(name);
        // Device-readable, outside guest memory, shorter than the header, too short for
        // the frame without MRG_RXBUF; then a good one.
        let a = rig.alloc(2048);
        let bad1 = rig.rx.add_chain(&[(a, 2048, false)]);
        let bad2 = rig
            .rx
            .add_chain(&[(GuestAddress(MEM_SIZE - 100), 2048, true)]);
        let bad3 = rig.rx.add_chain(&[(a, 8, true)]);
        let bad4 = rig.rx.add_chain(&[(a, 100, true)]);
        let (good, ga) = rig.post_rx(2048);
        let frames: Vec<_> = (0..5).map(|i| test_frame(i, 200)).collect();
        for f in &frames {
            sock.send(f);
        }
        wait_readable(rig.worker_tap_fd());
        for _ in 0..50 {
            rig.handle(TAP_TOKEN);
            if rig.m(&rig.metrics.rx_frames) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let used = rig.rx.take_used();
        assert_eq!(
            used,
            vec![
                (u32::from(bad1), 0),
                (u32::from(bad2), 0),
                (u32::from(bad3), 0),
                (u32::from(bad4), 0),
                (u32::from(good), 212)
            ]
        );
        assert_eq!(&rig.bytes(ga, 212)[12..], &frames[4][..]);
        assert_eq!(rig.m(&rig.metrics.rx_errors), 4);
        assert_eq!(rig.m(&rig.metrics.rx_dropped), 4);
        assert_eq!(rig.m(&rig.metrics.rx_frames), 1);
    });
}

#[test]
fn tx_frames_reach_the_interface_and_malformed_chains_are_dropped() {
    with_tap(
        "tx_frames_reach_the_interface_and_malformed_chains_are_dropped",
        |name| {
            let mut rig = Rig::new(name, true, None, None);
            let sock = PacketSocket::bind(name);
            let a = rig.alloc(70_000);
            // Short header, device-writable descriptor, oversize, outside guest memory.
            let bad = [
                rig.tx.add_chain(&[(a, 8, false)]),
                rig.tx.add_chain(&[(a, 12, false), (a, 100, true)]),
                rig.tx.add_chain(&[(a, 12, false), (a, 66_000, false)]),
                rig.tx
                    .add_chain(&[(a, 12, false), (GuestAddress(MEM_SIZE - 10), 100, false)]),
            ];
            let frame = test_frame(9, 1400);
            let good = rig.post_tx(&frame);
            rig.handle(TX_TOKEN);
            let used = rig.tx.take_used();
            let want: Vec<_> = bad
                .iter()
                .chain([&good])
                .map(|&h| (u32::from(h), 0))
                .collect();
            assert_eq!(used, want);
            let got = sock
                .recv_matching(Duration::from_secs(5), |f| f == &frame[..])
                .expect("the frame reaches the interface");
            assert_eq!(got, frame);
            assert_eq!(rig.m(&rig.metrics.tx_frames), 1);
            assert_eq!(rig.m(&rig.metrics.tx_bytes), 1400);
            assert_eq!(rig.m(&rig.metrics.tx_errors), 4);
            assert_eq!(rig.m(&rig.metrics.tx_dropped), 4);
            assert!(rig.intr.queue.load(Ordering::SeqCst) >= 1);
        },
    );
}

fn one_op_per_hour() -> RateLimiter {
    RateLimiter::new(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucket {
            size: 1,
            one_time_burst: None,
            refill_time_ms: 3_600_000,
        }),
    })
    .unwrap()
}

#[test]
fn rate_limiters_hold_frames_back_without_losing_them() {
    with_tap(
        "rate_limiters_hold_frames_back_without_losing_them",
        |name| {
            let mut rig = Rig::new(name, true, Some(one_op_per_hour()), Some(one_op_per_hour()));
            let sock = PacketSocket::bind(name);
            // Transmit: one frame goes, the second stays on the ring.
            rig.post_tx(&test_frame(1, 100));
            rig.post_tx(&test_frame(2, 100));
            rig.handle(TX_TOKEN);
            assert_eq!(rig.tx.take_used().len(), 1);
            assert_eq!(rig.m(&rig.metrics.tx_frames), 1);
            assert_eq!(rig.m(&rig.metrics.tx_throttled), 1);
            // Receive: one frame delivered, the next pending with the tap out of the set.
            rig.post_rx(2048);
            rig.post_rx(2048);
            sock.send(&test_frame(3, 100));
            sock.send(&test_frame(4, 100));
            wait_readable(rig.worker_tap_fd());
            for _ in 0..50 {
                rig.handle(TAP_TOKEN);
                if rig.worker.has_pending_frame() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(rig.rx.take_used().len(), 1);
            assert!(rig.worker.has_pending_frame());
            assert!(!rig.worker.is_reading_tap());
            assert_eq!(rig.m(&rig.metrics.rx_frames), 1);
            assert!(rig.m(&rig.metrics.rx_throttled) >= 1);
            assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
        },
    );
}

#[test]
fn an_active_device_moves_frames_both_ways_on_its_thread() {
    with_tap(
        "an_active_device_moves_frames_both_ways_on_its_thread",
        |name| {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let (mut rxd, rxq) = Driver::new(&mem, 0);
            let (mut txd, txq) = Driver::new(&mem, 0x4000);
            let rx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
            let tx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut dev = Net::new(NetConfig {
                tap: name.into(),
                mac: Some([2, 0, 0, 0, 0, 9]),
                ..Default::default()
            })
            .unwrap();
            let metrics = dev.metrics();
            let intr = Arc::new(CountingInterrupt::default());
            let health = DeviceHealth::new();
            dev.activate(crate::virtio::ActivateContext {
                mem: mem.clone(),
                queues: vec![
                    ActiveQueue {
                        index: 0,
                        queue: rxq,
                        notify: rx_notify.try_clone().unwrap(),
                    },
                    ActiveQueue {
                        index: 1,
                        queue: txq,
                        notify: tx_notify.try_clone().unwrap(),
                    },
                ],
                interrupt: intr.clone(),
                acked_features: dev.features(),
                health: health.clone(),
            })
            .unwrap();
            let sock = PacketSocket::bind(name);
            let wait = |what: &str, cond: &dyn Fn() -> bool| {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !cond() {
                    assert!(std::time::Instant::now() < deadline, "timed out: {what}");
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            // Receive: the frame arrives before the buffer; the notification brings it in.
            let frame = test_frame(5, 3000);
            sock.send(&frame);
            std::thread::sleep(Duration::from_millis(20));
            let buf = GuestAddress(0x10_0000);
            rxd.add_chain(&[(buf, 4096, true)]);
            rx_notify.write(1).unwrap();
            wait("rx", &|| metrics.rx_frames.load(Ordering::Relaxed) >= 1);
            let used = rxd.take_used();
            assert_eq!(used, vec![(0, 3012)]);
            let mut got = vec![0u8; 3012];
            mem.read_slice(&mut got, buf).unwrap();
            assert_eq!(&got[12..], &frame[..]);
            // Transmit.
            let out = test_frame(6, 5000);
            let tb = GuestAddress(0x20_0000);
            mem.write_slice(&[0u8; 12], tb).unwrap();
            mem.write_slice(&out, tb.unchecked_add(12)).unwrap();
            txd.add_chain(&[(tb, 12 + out.len() as u32, false)]);
            tx_notify.write(1).unwrap();
            let got = sock
                .recv_matching(Duration::from_secs(5), |f| f == &out[..])
                .expect("the guest's frame reaches the interface");
            assert_eq!(got.len(), out.len());
            wait("tx used", &|| {
                metrics.tx_frames.load(Ordering::Relaxed) == 1
            });
            assert_eq!(txd.take_used(), vec![(0, 0)]);
            assert_eq!(metrics.rx_bytes.load(Ordering::Relaxed), 3000);
            assert_eq!(metrics.tx_bytes.load(Ordering::Relaxed), 5000);
            assert!(!health.is_broken());
            dev.reset();
        },
    );
}
