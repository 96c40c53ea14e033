//! A test driver: lays out a split queue in guest memory and posts descriptor chains.

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use crate::virtio::test_driver::Desc;
use crate::virtio::test_driver::RingDriver;

/// The guest's CID in tests.
pub const GUEST_CID: u64 = 3;
/// Queue size of test queues.
pub const SIZE: u16 = 64;
const MEM_SIZE: u64 = 16 << 20;

/// The driver side of one queue, and the device's view of it (`queue`).
pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    ring: RingDriver,
    heap: u64,
    heap_end: u64,
}

impl Driver {
    /// A driver alone in its guest memory.
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        Self::with(&mem, 0)
    }

    /// Driver number `n` (0..4) in `mem`: its rings at `n * 0x4000`, its buffers in its own
    /// quarter of the rest.
    pub fn with(mem: &GuestMemoryMmap, n: u64) -> Self {
        let (ring, queue) = RingDriver::new(mem, n * 0x4000, SIZE);
        let quarter = (MEM_SIZE - 0x10_0000) / 4;
        let heap = 0x10_0000 + n * quarter;
        Driver {
            mem: mem.clone(),
            queue,
            ring,
            heap,
            heap_end: heap + quarter,
        }
    }

    /// `len` bytes of guest memory.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 63) & !63;
        assert!(self.heap <= self.heap_end, "test heap exhausted");
        GuestAddress(a)
    }

    /// `bytes` copied into guest memory.
    pub fn put(&mut self, bytes: &[u8]) -> GuestAddress {
        let a = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, a).unwrap();
        a
    }

    /// `len` bytes of guest memory at `a`.
    pub fn get(&self, a: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, a).unwrap();
        v
    }

    /// Posts a chain of `descs`, linked in order; returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        self.ring.add_chain(descs)
    }

    /// The used entries added since the last call: (id, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        self.ring.take_used()
    }
}
