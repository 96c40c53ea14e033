//! Unit tests of the driver core against a fake transport whose "device" serves the split
//! queue synchronously on notify, in host memory standing in for the DMA arena.

use super::*;
use std::boxed::Box;
use std::cell::RefCell;
use std::vec::Vec;

/// Page-aligned memory for a test pool.
#[repr(C, align(4096))]
struct Region([u8; 4 * 4096]);

fn region() -> Box<Region> {
    Box::new(Region([0x55; 4 * 4096]))
}

fn pool(r: &mut Region) -> DmaPool {
    // SAFETY: the region is valid, page-aligned and outlives the pool in every test; only the
    // pool (and the fake device, through the addresses it is given) touches it.
    unsafe { DmaPool::over(r.0.as_mut_ptr(), r.0.len()) }
}

/// How the fake device answers a notification.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Fill writable buffers with 0xa5 and return the chain with the bytes written.
    Serve,
    /// Return the chain with another id.
    WrongId,
    /// Bump the used index by two.
    Overrun,
    /// Never answer.
    Silent,
    /// Set DEVICE_NEEDS_RESET instead of answering.
    Break,
}

#[derive(Clone, Copy)]
struct Queue {
    max: u32,
    num: u16,
    ready: bool,
    addr: QueueAddresses,
}

struct State {
    status: u8,
    offered: u64,
    driver_features: u64,
    /// Whether the device clears FEATURES_OK (refusing the driver's features).
    refuse_features: bool,
    queue: Queue,
    answer: Answer,
    /// Avail entries taken.
    served: u16,
    /// The used index written.
    used_idx: u16,
    interrupts: u32,
    config: [u8; 32],
    generation: u32,
    /// Config reads left before the generation changes once.
    bump_generation_after: Option<u32>,
    notified: u32,
}

struct Fake(RefCell<State>);

impl Fake {
    fn new(offered: u64) -> Self {
        Fake(RefCell::new(State {
            status: 0,
            offered,
            driver_features: 0,
            refuse_features: false,
            queue: Queue {
                max: 256,
                num: 0,
                ready: false,
                addr: QueueAddresses {
                    desc: 0,
                    driver: 0,
                    device: 0,
                },
            },
            answer: Answer::Serve,
            served: 0,
            used_idx: 0,
            interrupts: 0,
            config: [0; 32],
            generation: 0,
            bump_generation_after: None,
            notified: 0,
        }))
    }
}

/// Host memory at a guest address (the test pool's addresses are host addresses).
fn mem_u16(addr: u64) -> u16 {
    // SAFETY: the address comes from the test pool (aligned ring fields).
    unsafe { (addr as *const u16).read_volatile() }
}
fn set_u16(addr: u64, v: u16) {
    // SAFETY: as above.
    unsafe { (addr as *mut u16).write_volatile(v) }
}
fn mem_u32(addr: u64) -> u32 {
    // SAFETY: as above.
    unsafe { (addr as *const u32).read_volatile() }
}
fn set_u32(addr: u64, v: u32) {
    // SAFETY: as above.
    unsafe { (addr as *mut u32).write_volatile(v) }
}
fn mem_u64(addr: u64) -> u64 {
    // SAFETY: as above.
    unsafe { (addr as *const u64).read_volatile() }
}
fn set_u8(addr: u64, v: u8) {
    // SAFETY: as above (a buffer the driver gave the device).
    unsafe { (addr as *mut u8).write_volatile(v) }
}

impl Fake {
    /// Serves every new avail entry.
    fn serve(&self) {
        let mut s = self.0.borrow_mut();
        let q = s.queue;
        assert!(q.ready && q.num.is_power_of_two());
        let n = u64::from(q.num);
        let avail_idx = mem_u16(q.addr.driver + 2);
        while s.served != avail_idx {
            let slot = u64::from(s.served) % n;
            s.served = s.served.wrapping_add(1);
            let head = mem_u16(q.addr.driver + 4 + 2 * slot);
            let mut written = 0u32;
            let mut d = head;
            loop {
                let at = q.addr.desc + 16 * u64::from(d);
                let (addr, len, flags, next) = (
                    mem_u64(at),
                    mem_u32(at + 8),
                    mem_u16(at + 12),
                    mem_u16(at + 14),
                );
                if flags & DESC_F_WRITE != 0 {
                    for i in 0..u64::from(len) {
                        set_u8(addr + i, 0xa5);
                    }
                    written += len;
                }
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                d = next;
            }
            let e = q.addr.device + 4 + 8 * (u64::from(s.used_idx) % n);
            let id = if s.answer == Answer::WrongId {
                u32::from(head) + 1
            } else {
                u32::from(head)
            };
            set_u32(e, id);
            set_u32(e + 4, written);
            s.used_idx = s.used_idx.wrapping_add(1);
            if s.answer == Answer::Overrun {
                s.used_idx = s.used_idx.wrapping_add(1);
            }
            set_u16(q.addr.device + 2, s.used_idx);
            s.interrupts |= 1;
        }
    }
}

impl Transport for Fake {
    fn status(&self) -> u8 {
        self.0.borrow().status
    }
    fn set_status(&self, status: u8) {
        let mut s = self.0.borrow_mut();
        if status == 0 {
            s.status = 0;
            s.queue.ready = false;
            s.served = 0;
            s.used_idx = 0;
            return;
        }
        // DEVICE_NEEDS_RESET stays until a reset.
        s.status = status | (s.status & STATUS_DEVICE_NEEDS_RESET);
        if s.refuse_features {
            s.status &= !STATUS_FEATURES_OK;
        }
    }
    fn device_features(&self) -> u64 {
        self.0.borrow().offered
    }
    fn set_driver_features(&self, features: u64) {
        self.0.borrow_mut().driver_features = features;
    }
    fn queue_max(&self, index: u16) -> u32 {
        if index == 0 {
            self.0.borrow().queue.max
        } else {
            0
        }
    }
    fn queue_ready(&self, index: u16) -> bool {
        index == 0 && self.0.borrow().queue.ready
    }
    fn set_queue(&self, index: u16, size: u16, addresses: QueueAddresses) {
        assert_eq!(index, 0);
        let mut s = self.0.borrow_mut();
        s.queue.num = size;
        s.queue.addr = addresses;
    }
    fn enable_queue(&self, index: u16) {
        assert_eq!(index, 0);
        self.0.borrow_mut().queue.ready = true;
    }
    fn notify(&self, index: u16) {
        assert_eq!(index, 0);
        let answer = {
            let mut s = self.0.borrow_mut();
            s.notified += 1;
            s.answer
        };
        match answer {
            Answer::Silent => {}
            Answer::Break => self.0.borrow_mut().status |= STATUS_DEVICE_NEEDS_RESET,
            _ => self.serve(),
        }
    }
    fn ack_interrupts(&self) -> u32 {
        core::mem::take(&mut self.0.borrow_mut().interrupts)
    }
    fn config_generation(&self) -> u32 {
        self.0.borrow().generation
    }
    fn config_u8(&self, offset: usize) -> u8 {
        self.0.borrow().config.get(offset).copied().unwrap_or(0)
    }
    fn config_u32(&self, offset: usize) -> u32 {
        let mut s = self.0.borrow_mut();
        if let Some(left) = s.bump_generation_after {
            if left == 0 {
                // The device changes its configuration between two reads.
                s.generation += 1;
                s.config[0] = 0x77;
                s.bump_generation_after = None;
            } else {
                s.bump_generation_after = Some(left - 1);
            }
        }
        match s.config.get(offset..offset + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layout arithmetic

#[test]
fn queue_layouts() {
    let l = QueueLayout::new(16).unwrap();
    assert_eq!((l.desc, l.avail, l.used, l.len), (0, 256, 296, 430));
    let l = QueueLayout::new(1).unwrap();
    assert_eq!((l.desc, l.avail, l.used, l.len), (0, 16, 24, 38));
    let l = QueueLayout::new(2).unwrap();
    // avail: 32 + 6 + 4 = 42, rounded up to 44 for the used ring.
    assert_eq!((l.avail, l.used, l.len), (32, 44, 44 + 6 + 16));
    let l = QueueLayout::new(256).unwrap();
    assert_eq!((l.avail, l.used, l.len), (4096, 4616, 4616 + 6 + 2048));
    let l = QueueLayout::new(32768).unwrap();
    assert_eq!(l.len, 16 * 32768 + (6 + 2 * 32768) + 2 + 6 + 8 * 32768);
    for size in (0..=15).map(|k| 1u16 << k) {
        let l = QueueLayout::new(size).unwrap();
        assert_eq!(l.avail % 2, 0);
        assert_eq!(l.used % 4, 0);
        assert!(l.avail >= 16 * usize::from(size));
        assert!(l.used >= l.avail + 6 + 2 * usize::from(size));
    }
    for bad in [0, 3, 12, 100, 65535] {
        assert_eq!(QueueLayout::new(bad), None, "{bad}");
    }
}

#[test]
fn queue_sizes() {
    assert_eq!(queue_size(0, 16), None);
    assert_eq!(queue_size(256, 0), None);
    assert_eq!(queue_size(1, 16), Some(1));
    assert_eq!(queue_size(3, 16), Some(2));
    assert_eq!(queue_size(12, 16), Some(8));
    assert_eq!(queue_size(16, 16), Some(16));
    assert_eq!(queue_size(24, 16), Some(16));
    assert_eq!(queue_size(1024, u16::MAX), Some(1024));
    assert_eq!(queue_size(u32::MAX, u16::MAX), Some(32768));
}

// ---------------------------------------------------------------------------------------------
// DMA memory

#[test]
fn pool_allocates_aligned_zeroed_buffers() {
    let mut r = region();
    let p = pool(&mut r);
    let a = p.alloc(1, 1).unwrap();
    let b = p.alloc(16, 16).unwrap();
    assert_eq!(b.addr() % 16, 0);
    assert!(b.addr() > a.addr());
    let c = p.alloc(4096, 4096).unwrap();
    assert_eq!(c.addr() % 4096, 0);
    assert!((0..4096).all(|i| c.read_u8(i) == 0), "zeroed");
    assert!(p.alloc(3 * 4096, 1).is_none(), "used up");
    assert!(p.alloc(1, 3).is_none(), "alignment not a power of two");
    assert!(p.alloc(1, 8192).is_none(), "alignment above a page");
    assert!(p.alloc(usize::MAX, 1).is_none());
    assert!(p.alloc(4096, 1).is_some());
}

#[test]
fn buffers_are_bounds_checked() {
    let mut r = region();
    let p = pool(&mut r);
    let b = p.alloc(8, 8).unwrap();
    b.write_u64(0, 0x1122_3344_5566_7788);
    assert_eq!(b.read_u32(0), 0x5566_7788);
    assert_eq!(b.read_u16(6), 0x1122);
    assert_eq!(b.read_u8(7), 0x11);
    // Outside, or misaligned: reads 0, writes nothing.
    assert_eq!(b.read_u8(8), 0);
    assert_eq!(b.read_u32(6), 0);
    assert_eq!(b.read_u16(1), 0);
    b.write_u32(6, 0xffff_ffff);
    b.write_u16(1, 0xffff);
    b.write_bytes(6, b"abcdef");
    assert_eq!(b.read_u64(0), 0x6261_3344_5566_7788);
    let mut out = [0xeeu8; 4];
    b.read_bytes(6, &mut out);
    assert_eq!(out, [b'a', b'b', 0, 0]);
    assert_eq!(b.writable(100).len, 8);
}

// ---------------------------------------------------------------------------------------------
// Initialization

#[test]
fn negotiation_takes_version_1_and_wanted_features() {
    let f = Fake::new(VIRTIO_F_VERSION_1 | 1 << 9 | 1 << 5 | 1 << 13);
    let (features, offered) = negotiate(&f, 1 << 9 | 1 << 6).unwrap();
    assert_eq!(features, VIRTIO_F_VERSION_1 | 1 << 9);
    assert_eq!(offered, VIRTIO_F_VERSION_1 | 1 << 9 | 1 << 5 | 1 << 13);
    assert_eq!(f.0.borrow().driver_features, features);
    assert_eq!(
        f.status(),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    );
}

#[test]
fn negotiation_failures() {
    let f = Fake::new(1 << 9);
    assert_eq!(
        negotiate(&f, 0),
        Err(VirtioError::NoVersion1 { features: 1 << 9 })
    );
    assert_ne!(f.status() & STATUS_FAILED, 0, "the driver gave up");

    let f = Fake::new(VIRTIO_F_VERSION_1);
    f.0.borrow_mut().refuse_features = true;
    let e = negotiate(&f, 0).unwrap_err();
    assert_eq!(
        e,
        VirtioError::Status {
            after: "FEATURES_OK",
            expected: 0x0b,
            status: 0x03
        }
    );
    assert_eq!(
        std::format!("{e}"),
        "status 0x03 after setting FEATURES_OK (wrote 0x0b, bits 0x08 missing)"
    );
}

#[test]
fn needs_reset_is_a_failure() {
    let f = Fake::new(VIRTIO_F_VERSION_1);
    negotiate(&f, 0).unwrap();
    f.0.borrow_mut().status |= STATUS_DEVICE_NEEDS_RESET;
    let e = driver_ok(&f).unwrap_err();
    assert!(
        matches!(e, VirtioError::Status { status: 0x4f, .. }),
        "{e:?}"
    );
    assert!(std::format!("{e}").contains("DEVICE_NEEDS_RESET"));
}

#[test]
fn queue_setup() {
    let mut r = region();
    let p = pool(&mut r);
    let f = Fake::new(VIRTIO_F_VERSION_1);
    negotiate(&f, 0).unwrap();
    let mem = p.alloc(4096, 16).unwrap();
    let _q = setup_queue(&f, 0, 16, mem).unwrap();
    let s = f.0.borrow();
    assert!(s.queue.ready);
    assert_eq!(s.queue.num, 16);
    assert_eq!(s.queue.addr.desc, mem.addr());
    assert_eq!(s.queue.addr.driver, mem.addr() + 256);
    assert_eq!(s.queue.addr.device, mem.addr() + 296);
    drop(s);
    assert_eq!(
        setup_queue(&f, 0, 16, mem).err(),
        Some(VirtioError::QueueAlreadyReady { index: 0 })
    );
    assert_eq!(
        setup_queue(&f, 1, 16, mem).err(),
        Some(VirtioError::QueueUnavailable { index: 1 })
    );
    f.0.borrow_mut().queue.ready = false;
    let small = p.alloc(100, 16).unwrap();
    assert_eq!(
        setup_queue(&f, 0, 16, small).err(),
        Some(VirtioError::QueueMemory)
    );
}

// ---------------------------------------------------------------------------------------------
// Requests

/// A device with queue 0 set up (size 4), and a pool for buffers.
fn live<'a>(f: &Fake, p: &'a DmaPool) -> SplitQueue<'a> {
    f.0.borrow_mut().queue.max = 4;
    negotiate(f, 0).unwrap();
    let q = setup_queue(f, 0, 16, p.alloc(4096, 16).unwrap()).unwrap();
    driver_ok(f).unwrap();
    q
}

#[test]
fn requests_round_trip_many_times() {
    let mut r = region();
    let p = pool(&mut r);
    let f = Fake::new(VIRTIO_F_VERSION_1);
    let mut q = live(&f, &p);
    assert_eq!(f.0.borrow().queue.num, 4);
    let header = p.alloc(16, 16).unwrap();
    let data = p.alloc(512, 512).unwrap();
    let status = p.alloc(1, 1).unwrap();
    // More requests than the ring has entries, so that the indexes wrap the ring.
    for round in 0..10u32 {
        data.fill(0);
        header.write_u32(0, round);
        let used = transact(
            &f,
            &mut q,
            &[header.readable(16), data.writable(512), status.writable(1)],
            100,
        )
        .unwrap();
        assert_eq!(used, Used { id: 0, len: 513 });
        assert!((0..512).all(|i| data.read_u8(i) == 0xa5));
        assert_eq!(f.0.borrow().interrupts, 0, "acknowledged");
    }
    assert_eq!(f.0.borrow().notified, 10);
    // The chain as the device saw it.
    let desc = f.0.borrow().queue.addr.desc;
    assert_eq!(mem_u64(desc), header.addr());
    assert_eq!(mem_u32(desc + 8), 16);
    assert_eq!(mem_u16(desc + 12), DESC_F_NEXT);
    assert_eq!(mem_u16(desc + 14), 1);
    assert_eq!(mem_u16(desc + 16 + 12), DESC_F_NEXT | DESC_F_WRITE);
    assert_eq!(mem_u16(desc + 32 + 12), DESC_F_WRITE);
    // Bad requests.
    assert_eq!(
        transact(&f, &mut q, &[], 100),
        Err(VirtioError::TooManySegments {
            segments: 0,
            size: 4
        })
    );
    let five = [status.writable(1); 5];
    assert_eq!(
        transact(&f, &mut q, &five, 100),
        Err(VirtioError::TooManySegments {
            segments: 5,
            size: 4
        })
    );
}

#[test]
fn many_chains_in_flight() {
    let mut r = region();
    let p = pool(&mut r);
    let f = Fake::new(VIRTIO_F_VERSION_1);
    f.0.borrow_mut().queue.max = 8;
    negotiate(&f, 0).unwrap();
    let mut q = setup_queue(&f, 0, 16, p.alloc(4096, 16).unwrap()).unwrap();
    driver_ok(&f).unwrap();
    assert_eq!(q.size(), 8);
    // Four chains of two descriptors: a 4-byte device-readable header and a 4-byte buffer.
    let bufs = p.alloc(64, 16).unwrap();
    for i in 0..4u16 {
        let at = bufs.addr() + 16 * u64::from(i);
        let head = 2 * i;
        let header = Segment {
            addr: at,
            len: 4,
            device_writes: false,
        };
        let data = Segment {
            addr: at + 8,
            len: 4,
            device_writes: true,
        };
        q.set_descriptor(head, header, Some(head + 1));
        q.set_descriptor(head + 1, data, None);
    }
    // Out of range: ignored.
    q.set_descriptor(8, bufs.readable(4), None);
    for round in 0..5 {
        for i in 0..4u16 {
            q.offer(2 * i).unwrap();
        }
        assert_eq!(q.in_flight(), 4);
        assert_eq!(
            f.0.borrow().served,
            4 * round,
            "nothing shown before publish"
        );
        // Without EVENT_IDX the device wants notifications unless its flags say NO_NOTIFY.
        assert!(q.publish(false));
        assert!(!q.publish(false), "nothing new");
        f.notify(0);
        let idx = q.used_index();
        let mut ids = Vec::new();
        while let Some(u) = q.pop_used_before(idx).unwrap() {
            assert_eq!(u.len, 4);
            ids.push(u.id);
        }
        assert_eq!(ids, [0, 2, 4, 6]);
        assert_eq!(q.in_flight(), 0);
    }
    // A full queue refuses more.
    for i in 0..8 {
        q.offer(i).unwrap();
    }
    assert_eq!(q.offer(0), Err(VirtioError::Busy));
    // NO_NOTIFY in the used ring's flags: no notification wanted.
    let used = f.0.borrow().queue.addr.device;
    set_u16(used, USED_F_NO_NOTIFY);
    assert!(!q.publish(false));
}

#[test]
fn event_idx_notifications_and_interrupt_suppression() {
    let mut r = region();
    let p = pool(&mut r);
    let f = Fake::new(VIRTIO_F_VERSION_1);
    f.0.borrow_mut().queue.max = 8;
    negotiate(&f, 0).unwrap();
    let mut q = setup_queue(&f, 0, 16, p.alloc(4096, 16).unwrap()).unwrap();
    let (driver, device) = {
        let s = f.0.borrow();
        (s.queue.addr.driver, s.queue.addr.device)
    };
    let avail_event = device + 4 + 8 * 8;
    let used_event = driver + 4 + 2 * 8;
    // The device waits at avail index 0: publishing 0 -> 2 crosses it.
    set_u16(avail_event, 0);
    q.offer(0).unwrap();
    q.offer(1).unwrap();
    assert!(q.publish(true));
    // It asked at 1, which is behind what it was shown: publishing 2 -> 3 does not cross 1
    // (it will look at the avail ring again on its own).
    set_u16(avail_event, 1);
    q.offer(2).unwrap();
    assert!(!q.publish(true));
    // It asked at 3, the index it was last shown: 3 -> 4 crosses it.
    set_u16(avail_event, 3);
    q.offer(3).unwrap();
    assert!(q.publish(true));
    // Interrupts: used_event half the index space ahead of what was taken; without EVENT_IDX
    // the avail flags say NO_INTERRUPT.
    q.suppress_interrupts(true);
    assert_eq!(mem_u16(used_event), 0x8000);
    assert_eq!(mem_u16(driver), 0);
    q.suppress_interrupts(false);
    assert_eq!(mem_u16(driver), AVAIL_F_NO_INTERRUPT);
}

#[test]
fn misbehaving_devices() {
    let mut r = region();
    for (answer, want) in [
        (Answer::WrongId, VirtioError::UsedId { id: 1, head: 0 }),
        (Answer::Overrun, VirtioError::UsedOverrun { from: 0, to: 2 }),
        (Answer::Silent, VirtioError::Timeout { ms: 20 }),
        (Answer::Break, VirtioError::NeedsReset { status: 0x4f }),
    ] {
        let f = Fake::new(VIRTIO_F_VERSION_1);
        let p = pool(&mut r);
        let mut q = live(&f, &p);
        let status = p.alloc(1, 1).unwrap();
        let seg = [status.writable(1)];
        f.0.borrow_mut().answer = answer;
        assert_eq!(transact(&f, &mut q, &seg, 20), Err(want));
        if answer == Answer::Silent {
            // Still in flight: no second request on this queue.
            assert_eq!(transact(&f, &mut q, &seg, 20), Err(VirtioError::Busy));
        }
        reset(&f).unwrap();
        assert_eq!(f.status(), 0);
    }
}

#[test]
fn config_reads_retry_on_generation_change() {
    let f = Fake::new(VIRTIO_F_VERSION_1);
    {
        let mut s = f.0.borrow_mut();
        s.config[..8].copy_from_slice(&0x0000_0001_0000_2000u64.to_le_bytes());
        // The low half changes before the high half is read: the first attempt (0x1_0000_2000)
        // is thrown away.
        s.bump_generation_after = Some(1);
    }
    assert_eq!(config_u64(&f, 0), 0x0000_0001_0000_2077);
    assert_eq!(f.0.borrow().generation, 1);
}

#[test]
fn failure_messages() {
    struct Dev;
    impl fmt::Display for Dev {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("vda at 0xc0001000")
        }
    }
    let t = Failure {
        device: &Dev,
        step: "GET_ID",
        error: VirtioError::Timeout { ms: 2000 },
    };
    assert_eq!(
        std::format!("{t}"),
        "GET_ID: no answer from vda at 0xc0001000 after 2000 ms"
    );
    let q = Failure {
        device: &Dev,
        step: "queue 0",
        error: VirtioError::QueueUnavailable { index: 0 },
    };
    assert_eq!(
        std::format!("{q}"),
        "vda at 0xc0001000: queue 0: queue 0: QueueNumMax is 0"
    );
    let v: Vec<_> = [VirtioError::Magic(0), VirtioError::Version(1)]
        .iter()
        .map(|e| std::format!("{e}"))
        .collect();
    assert_eq!(
        v,
        [
            "MagicValue 0x00000000 (expected 0x74726976, \"virt\")",
            "Version 1 (expected 2, modern virtio-mmio)"
        ]
    );
}

#[test]
fn mmio_windows() {
    assert!(Mmio::new(0xc000_1000, 0x1000).is_ok());
    assert!(Mmio::new(0xffff_f000, 0x1000).is_ok());
    for (base, size) in [
        (0x1000_0000, 0x1000),
        (0xffff_f000, 0x2000),
        (0xc000_1002, 0x1000),
        (0xc000_1000, 0x100),
        (u64::MAX - 0xfff, 0x1000),
    ] {
        assert_eq!(
            Mmio::new(base, size),
            Err(VirtioError::Window { base, size })
        );
    }
}
