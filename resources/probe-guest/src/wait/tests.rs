//! Unit tests of the waiting loop's parts: the ticker, and the disk watcher against a fake
//! virtio-blk device whose queue is served synchronously on notify, in host memory standing in
//! for the DMA arena.

use super::*;
use crate::virtio::QueueAddresses;
use std::boxed::Box;
use std::cell::RefCell;
use std::string::ToString;
use std::vec::Vec;

// ---------------------------------------------------------------------------------------------
// Ticks

#[test]
fn ticks_come_every_period() {
    let mut t = Ticker::new(1000, 100);
    assert_eq!(t.due(1000), None);
    assert_eq!(t.due(1099), None);
    assert_eq!(t.due(1100), Some(1));
    assert_eq!(t.due(1100), None, "one tick a period");
    assert_eq!(t.due(1150), None);
    // A poll a little late does not shift the schedule.
    assert_eq!(t.due(1205), Some(2));
    assert_eq!(t.due(1299), None);
    assert_eq!(t.due(1300), Some(3));
}

#[test]
fn a_late_tick_does_not_bring_the_missed_ones() {
    let mut t = Ticker::new(0, 100);
    assert_eq!(t.due(100), Some(1));
    // Paused from 150 to 10_000: one tick, then the schedule restarts from then.
    assert_eq!(t.due(10_000), Some(2));
    assert_eq!(t.due(10_001), None);
    assert_eq!(t.due(10_099), None);
    assert_eq!(t.due(10_100), Some(3));
    // A zero period (a TSC rate of 0) still ticks at most once a call.
    let mut z = Ticker::new(5, 0);
    assert_eq!(z.due(5), None);
    assert_eq!(z.due(6), Some(1));
    assert_eq!(z.due(6), None);
    // Near the end of the counter: no overflow.
    let mut m = Ticker::new(u64::MAX - 10, 100);
    assert_eq!(m.due(u64::MAX - 1), None);
    assert_eq!(m.due(u64::MAX), Some(1));
}

// ---------------------------------------------------------------------------------------------
// A fake virtio-blk device

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

/// Guest memory at a guest address (the test pool's addresses are host addresses).
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

struct Disk {
    status: u8,
    driver_features: u64,
    ready: bool,
    num: u16,
    addr: QueueAddresses,
    served: u16,
    used_idx: u16,
    interrupts: u32,
    generation: u32,
    /// The backing file: its length is the capacity.
    image: Vec<u8>,
    id: &'static [u8],
    read_only: bool,
    /// Answer no request (the used ring never moves).
    silent: bool,
    /// QueueNumMax reads 0.
    no_queue: bool,
    /// Raise a configuration change interrupt while serving the next request.
    change_while_serving: bool,
    resets: u32,
    requests: Vec<(u32, u64)>,
}

struct FakeBlk(RefCell<Disk>);

impl FakeBlk {
    fn new(image: Vec<u8>, id: &'static [u8]) -> Self {
        FakeBlk(RefCell::new(Disk {
            status: 0,
            driver_features: 0,
            ready: false,
            num: 0,
            addr: QueueAddresses {
                desc: 0,
                driver: 0,
                device: 0,
            },
            served: 0,
            used_idx: 0,
            interrupts: 0,
            generation: 0,
            image,
            id,
            read_only: false,
            silent: false,
            no_queue: false,
            change_while_serving: false,
            resets: 0,
            requests: Vec::new(),
        }))
    }

    /// What the VMM does on a drive swap: a new backing file, then a configuration change
    /// interrupt (`interrupt`) and/or a new generation (`bump`).
    fn swap(&self, image: Vec<u8>, interrupt: bool, bump: bool) {
        let mut d = self.0.borrow_mut();
        d.image = image;
        if interrupt {
            d.interrupts |= INT_CONFIG_CHANGE;
        }
        if bump {
            d.generation += 1;
        }
    }

    fn capacity(&self) -> u64 {
        self.0.borrow().image.len() as u64 / SECTOR
    }

    /// Serves every new avail entry: header (type, sector), data, status.
    fn serve(&self) {
        let mut d = self.0.borrow_mut();
        let n = u64::from(d.num);
        let avail_idx = mem_u16(d.addr.driver + 2);
        while d.served != avail_idx {
            let slot = u64::from(d.served) % n;
            d.served = d.served.wrapping_add(1);
            let head = mem_u16(d.addr.driver + 4 + 2 * slot);
            // The chain: three descriptors.
            let desc = |i: u16| {
                let at = d.addr.desc + 16 * u64::from(i);
                (
                    mem_u64(at),
                    mem_u32(at + 8),
                    mem_u16(at + 12),
                    mem_u16(at + 14),
                )
            };
            let (h, _, _, next) = desc(head);
            let (data, data_len, _, next) = desc(next);
            let (status, _, _, _) = desc(next);
            let kind = mem_u32(h);
            let sector = mem_u64(h + 8);
            d.requests.push((kind, sector));
            let (code, written) = match kind {
                T_IN => {
                    let start = sector.saturating_mul(SECTOR) as usize;
                    match d.image.get(start..start + data_len as usize) {
                        Some(bytes) => {
                            for (i, &b) in bytes.iter().enumerate() {
                                set_u8(data + i as u64, b);
                            }
                            (S_OK, data_len)
                        }
                        None => (1, 0),
                    }
                }
                T_GET_ID => {
                    for (i, &b) in d.id.iter().take(data_len as usize).enumerate() {
                        set_u8(data + i as u64, b);
                    }
                    (S_OK, d.id.len().min(data_len as usize) as u32)
                }
                _ => (2, 0),
            };
            set_u8(status, code);
            let e = d.addr.device + 4 + 8 * (u64::from(d.used_idx) % n);
            set_u32(e, u32::from(head));
            set_u32(e + 4, written + 1);
            d.used_idx = d.used_idx.wrapping_add(1);
            set_u16(d.addr.device + 2, d.used_idx);
            d.interrupts |= 1;
            if core::mem::take(&mut d.change_while_serving) {
                d.interrupts |= INT_CONFIG_CHANGE;
            }
        }
    }
}

impl Transport for FakeBlk {
    fn status(&self) -> u8 {
        self.0.borrow().status
    }
    fn set_status(&self, status: u8) {
        let mut d = self.0.borrow_mut();
        if status == 0 {
            // As cgvm's virtio-mmio: queues and interrupt status cleared, generation bumped.
            d.status = 0;
            d.ready = false;
            d.served = 0;
            d.used_idx = 0;
            d.interrupts = 0;
            d.generation += 1;
            d.resets += 1;
            return;
        }
        d.status = status | (d.status & STATUS_DEVICE_NEEDS_RESET);
    }
    fn device_features(&self) -> u64 {
        let ro = if self.0.borrow().read_only { F_RO } else { 0 };
        virtio::VIRTIO_F_VERSION_1 | ro
    }
    fn set_driver_features(&self, features: u64) {
        self.0.borrow_mut().driver_features = features;
    }
    fn queue_max(&self, index: u16) -> u32 {
        if index == 0 && !self.0.borrow().no_queue {
            256
        } else {
            0
        }
    }
    fn queue_ready(&self, index: u16) -> bool {
        index == 0 && self.0.borrow().ready
    }
    fn set_queue(&self, index: u16, size: u16, addresses: QueueAddresses) {
        assert_eq!(index, 0);
        let mut d = self.0.borrow_mut();
        d.num = size;
        d.addr = addresses;
    }
    fn enable_queue(&self, index: u16) {
        assert_eq!(index, 0);
        self.0.borrow_mut().ready = true;
    }
    fn notify(&self, index: u16) {
        assert_eq!(index, 0);
        let (live, silent) = {
            let d = self.0.borrow();
            (
                d.ready && d.status & STATUS_DRIVER_OK != 0,
                d.silent || d.status & STATUS_DEVICE_NEEDS_RESET != 0,
            )
        };
        if live && !silent {
            self.serve();
        }
    }
    fn ack_interrupts(&self) -> u32 {
        core::mem::take(&mut self.0.borrow_mut().interrupts)
    }
    fn config_generation(&self) -> u32 {
        self.0.borrow().generation
    }
    fn config_u8(&self, offset: usize) -> u8 {
        self.0.borrow().image.len().to_le_bytes()[offset % 8]
    }
    fn config_u32(&self, offset: usize) -> u32 {
        let capacity = self.capacity().to_le_bytes();
        match offset {
            0 => u32::from_le_bytes([capacity[0], capacity[1], capacity[2], capacity[3]]),
            4 => u32::from_le_bytes([capacity[4], capacity[5], capacity[6], capacity[7]]),
            _ => 0,
        }
    }
}

/// An image of `sectors` sectors, each filled with its number's low byte, except for a text
/// at the start of sector 0.
fn image(sectors: usize, text: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    v[..text.len()].copy_from_slice(text);
    v
}

fn line<T: Transport>(disk: &Watched<'_, T>, change: Change) -> std::string::String {
    Changed { disk, change }.to_string()
}

// ---------------------------------------------------------------------------------------------
// The watcher

#[test]
fn a_swapped_drive_is_reported_once() {
    let mut r = region();
    let p = pool(&mut r);
    let bufs = Buffers::new(&p).unwrap();
    let f = FakeBlk::new(image(64, b"first disk"), b"disk0");
    let ring = virtio::queue_memory(&p, QUEUE_LIMIT).unwrap();
    let (mut w, started) = Watched::start(f, 0, ring, &bufs);
    assert_eq!(started, Ok(()));
    assert_eq!(w.name().to_string(), "disk0");
    assert_eq!(w.t.0.borrow().status, STATUS_LIVE);
    assert_eq!(w.t.0.borrow().num, 4);
    assert_eq!(w.t.0.borrow().driver_features, virtio::VIRTIO_F_VERSION_1);
    // The GET_ID's used-buffer interrupt was acknowledged: nothing to report.
    assert_eq!(w.poll(&bufs, 0), None);
    assert_eq!(w.poll(&bufs, 0), None);

    // A swap with a configuration change interrupt (and the generation unchanged).
    w.t.swap(image(128, b"the second disk!"), true, false);
    let change = w.poll(&bufs, 0).unwrap();
    assert_eq!(
        change,
        Change {
            capacity: 128,
            sector: 0,
            data: Ok(*b"the second disk!"),
        }
    );
    assert_eq!(
        line(&w, change),
        "blk disk0 config changed: capacity 128 sectors, sector 0: \
         74 68 65 20 73 65 63 6f 6e 64 20 64 69 73 6b 21"
    );
    assert_eq!(w.t.0.borrow().interrupts, 0, "acknowledged");
    assert_eq!(w.poll(&bufs, 0), None, "reported once");
    assert_eq!(w.t.0.borrow().resets, 1, "the live device was reused");

    // A swap that only bumps the generation, and another sector.
    w.t.swap(image(16, b""), false, true);
    let change = w.poll(&bufs, 5).unwrap();
    assert_eq!(change.capacity, 16);
    assert_eq!(change.data, Ok([5; SHOWN]));
    assert_eq!(
        line(&w, change),
        "blk disk0 config changed: capacity 16 sectors, sector 5: \
         05 05 05 05 05 05 05 05 05 05 05 05 05 05 05 05"
    );
    assert_eq!(w.poll(&bufs, 5), None);
    // Both at once: one report.
    w.t.swap(image(32, b""), true, true);
    assert!(w.poll(&bufs, 1).is_some());
    assert_eq!(w.poll(&bufs, 1), None);
    assert_eq!(
        w.t.0.borrow().requests,
        [(T_GET_ID, 0), (T_IN, 0), (T_IN, 5), (T_IN, 1)]
    );
}

#[test]
fn a_device_left_live_or_broken_is_restarted() {
    let mut r = region();
    let p = pool(&mut r);
    let bufs = Buffers::new(&p).unwrap();
    let f = FakeBlk::new(image(8, b"abc"), b"");
    // Left DRIVER_OK with queue 0 ready by a check.
    {
        let mut d = f.0.borrow_mut();
        d.status = STATUS_LIVE;
        d.ready = true;
    }
    let ring = virtio::queue_memory(&p, QUEUE_LIMIT).unwrap();
    let (mut w, started) = Watched::start(f, 3, ring, &bufs);
    assert_eq!(started, Ok(()));
    assert_eq!(w.name().to_string(), "3", "no id: the index");
    assert_eq!(w.t.0.borrow().resets, 1);
    assert_eq!(w.poll(&bufs, 0), None);

    // The device breaks (DEVICE_NEEDS_RESET and a configuration change, as the spec has it).
    {
        let mut d = w.t.0.borrow_mut();
        d.status |= STATUS_DEVICE_NEEDS_RESET;
        d.interrupts |= INT_CONFIG_CHANGE;
    }
    let change = w.poll(&bufs, 0).unwrap();
    assert_eq!(w.t.0.borrow().resets, 2, "restarted");
    assert_eq!(change.capacity, 8);
    assert_eq!(change.data.map(|d| d[..3] == *b"abc"), Ok(true));
    // The restart's own generation bump is not a change.
    assert_eq!(w.poll(&bufs, 0), None);
    assert_eq!(w.t.0.borrow().status, STATUS_LIVE);

    // Reset from outside (status 0): restarted on the next change.
    w.t.set_status(0);
    let change = w.poll(&bufs, 0).expect("the reset bumped the generation");
    assert!(change.data.is_ok());
    assert_eq!(w.poll(&bufs, 0), None);
}

#[test]
fn read_problems_are_reported_and_recovered_from() {
    let mut r = region();
    let p = pool(&mut r);
    let bufs = Buffers::new(&p).unwrap();
    let f = FakeBlk::new(image(8, b""), b"data");
    let ring = virtio::queue_memory(&p, QUEUE_LIMIT).unwrap();
    let (mut w, started) = Watched::start(f, 0, ring, &bufs);
    assert_eq!(started, Ok(()));

    // Past the end of the new image.
    w.t.swap(image(4, b""), true, false);
    let change = w.poll(&bufs, 4).unwrap();
    assert_eq!(change.data, Err(ReadError::Status(1)));
    assert_eq!(
        line(&w, change),
        "blk data config changed: capacity 4 sectors, sector 4: read failed: status 1 (IOERR)"
    );

    // A device that does not answer: the request times out, the queue is dropped ...
    assert_eq!(w.timeout_ms, TIMEOUT_MS);
    w.timeout_ms = 20;
    w.t.0.borrow_mut().silent = true;
    w.t.swap(image(4, b""), true, false);
    let change = w.poll(&bufs, 0).unwrap();
    assert_eq!(
        change.data,
        Err(ReadError::Virtio(VirtioError::Timeout { ms: 20 }))
    );
    assert!(
        line(&w, change).ends_with("sector 0: read failed: no answer from the device after 20 ms")
    );
    // ... and the device restarted on the next change.
    w.t.0.borrow_mut().silent = false;
    let resets = w.t.0.borrow().resets;
    w.t.swap(image(4, b"back"), true, false);
    let change = w.poll(&bufs, 0).unwrap();
    assert_eq!(change.data.map(|d| d[..4] == *b"back"), Ok(true));
    assert_eq!(w.t.0.borrow().resets, resets + 1);
}

#[test]
fn a_change_during_the_read_is_not_lost() {
    let mut r = region();
    let p = pool(&mut r);
    let bufs = Buffers::new(&p).unwrap();
    let f = FakeBlk::new(image(8, b""), b"disk1");
    let ring = virtio::queue_memory(&p, QUEUE_LIMIT).unwrap();
    let (mut w, _) = Watched::start(f, 1, ring, &bufs);
    w.t.swap(image(16, b"one"), true, false);
    // The second swap's interrupt comes while the first one's read is in flight; the read
    // acknowledges it with its own.
    w.t.0.borrow_mut().change_while_serving = true;
    assert_eq!(w.poll(&bufs, 0).map(|c| c.capacity), Some(16));
    w.t.0.borrow_mut().image = image(24, b"two");
    let change = w.poll(&bufs, 0).expect("the second change");
    assert_eq!(change.capacity, 24);
    assert_eq!(change.data.map(|d| d[..3] == *b"two"), Ok(true));
    assert_eq!(w.poll(&bufs, 0), None);
}

#[test]
fn a_device_that_cannot_start_is_still_watched() {
    let mut r = region();
    let p = pool(&mut r);
    let bufs = Buffers::new(&p).unwrap();
    let f = FakeBlk::new(image(8, b"late"), b"disk0");
    f.0.borrow_mut().no_queue = true;
    let ring = virtio::queue_memory(&p, QUEUE_LIMIT).unwrap();
    let (mut w, started) = Watched::start(f, 0, ring, &bufs);
    let error = ReadError::Start("queue 0", VirtioError::QueueUnavailable { index: 0 });
    assert_eq!(started, Err(error));
    assert_eq!(
        error.to_string(),
        "starting the device: queue 0: queue 0: QueueNumMax is 0"
    );
    assert_eq!(w.name().to_string(), "0", "the id is unknown");
    // Still failing at the next change: the line says why.
    w.t.swap(image(8, b"late"), true, false);
    let change = w.poll(&bufs, 0).unwrap();
    assert_eq!(change.capacity, 8);
    assert_eq!(change.data, Err(error));
    assert_eq!(
        line(&w, change),
        "blk 0 config changed: capacity 8 sectors, sector 0: read failed: starting the \
         device: queue 0: queue 0: QueueNumMax is 0"
    );
    w.t.0.borrow_mut().no_queue = false;
    w.t.swap(image(8, b"late"), true, false);
    let change = w.poll(&bufs, 0).unwrap();
    assert_eq!(change.data.map(|d| d[..4] == *b"late"), Ok(true));
}

#[test]
fn used_length_and_names() {
    assert_eq!(
        ReadError::UsedLen {
            got: 1,
            min: 513,
            max: 513
        }
        .to_string(),
        "used length 1, expected 513"
    );
    assert_eq!(
        ReadError::UsedLen {
            got: 30,
            min: 1,
            max: 21
        }
        .to_string(),
        "used length 30, expected 1..=21"
    );
    assert_eq!(
        Name {
            id: b"a b\x01",
            index: 2
        }
        .to_string(),
        "a b\\x01"
    );
    assert_eq!(Name { id: b"", index: 2 }.to_string(), "2");
}
