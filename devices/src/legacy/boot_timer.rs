//! The boot timer: a 4 KiB MMIO window where the guest writes the byte 123 at offset 0 when it
//! considers boot complete. The first such write records the time since the VMM started, logs
//! it, and makes it available to the VMM through a [`BootCompletion`] handle.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Size of the MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

/// The byte the guest writes at offset 0 to say boot is complete.
pub const BOOT_COMPLETE_MAGIC: u8 = 123;

/// When the guest said boot was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootComplete {
    /// The moment of the guest's write.
    pub at: Instant,
    /// Time from the VMM's start to that write.
    pub elapsed: Duration,
}

/// A shared slot holding the first [`BootComplete`]; clones see the same slot.
#[derive(Debug, Clone, Default)]
pub struct BootCompletion(Arc<OnceLock<BootComplete>>);

impl BootCompletion {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The recorded completion, once the guest has signalled it.
    pub fn get(&self) -> Option<BootComplete> {
        self.0.get().copied()
    }

    /// Records `done` unless something is recorded already; returns whether it was recorded.
    fn set(&self, done: BootComplete) -> bool {
        self.0.set(done).is_ok()
    }
}

/// The boot timer as an MMIO bus device of length [`BOOT_TIMER_LEN`].
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    completion: BootCompletion,
}

impl BootTimer {
    /// A boot timer measuring from `start` (the VMM's start), with a fresh completion slot.
    pub fn new(start: Instant) -> Self {
        Self::with_completion(start, BootCompletion::new())
    }

    /// A boot timer measuring from `start` that records into `completion`.
    pub fn with_completion(start: Instant, completion: BootCompletion) -> Self {
        Self { start, completion }
    }

    /// A handle on the completion slot, for the VMM's timeline.
    pub fn completion(&self) -> BootCompletion {
        self.completion.clone()
    }

    fn elapsed_us(&self) -> u32 {
        self.completion
            .get()
            .map(|c| u32::try_from(c.elapsed.as_micros()).unwrap_or(u32::MAX))
            .unwrap_or(0)
    }
}

impl crate::bus::BusDevice for BootTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.elapsed_us().to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_COMPLETE_MAGIC] {
            log::debug!("boot timer: write of {data:x?} at offset {offset:#x} ignored");
            return;
        }
        let at = Instant::now();
        let elapsed = at.saturating_duration_since(self.start);
        if self.completion.set(BootComplete { at, elapsed }) {
            log::info!(
                "guest boot completed after {:.3} ms",
                elapsed.as_secs_f64() * 1000.0
            );
        } else {
            log::debug!("boot timer: boot already complete; signal ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn read_u32(t: &mut BootTimer) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn records_the_first_signal_only() {
        let start = Instant::now() - Duration::from_millis(5);
        let mut t = BootTimer::new(start);
        let handle = t.completion();
        assert_eq!(handle.get(), None);
        assert_eq!(read_u32(&mut t), 0);
        t.write(0, &[BOOT_COMPLETE_MAGIC]);
        let first = handle.get().expect("recorded");
        assert!(first.elapsed >= Duration::from_millis(5));
        assert_eq!(first.at.duration_since(start), first.elapsed);
        let us = read_u32(&mut t);
        assert_eq!(u128::from(us), first.elapsed.as_micros());
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(handle.get(), Some(first));
        assert_eq!(read_u32(&mut t), us);
    }

    #[test]
    fn shared_slot_and_other_writes() {
        let slot = BootCompletion::new();
        let mut t = BootTimer::with_completion(Instant::now(), slot.clone());
        t.write(0, &[122]);
        t.write(1, &[BOOT_COMPLETE_MAGIC]);
        t.write(0, &[BOOT_COMPLETE_MAGIC, 0, 0, 0]);
        t.write(0xfff, &[BOOT_COMPLETE_MAGIC]);
        t.write(u64::MAX, &[BOOT_COMPLETE_MAGIC; 8]);
        t.write(0, &[]);
        assert_eq!(slot.get(), None);
        t.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert!(slot.get().is_some());
    }

    #[test]
    fn other_reads_return_zero() {
        let mut t = BootTimer::new(Instant::now() - Duration::from_secs(1));
        t.write(0, &[BOOT_COMPLETE_MAGIC]);
        for (offset, len) in [
            (0, 1),
            (0, 2),
            (0, 8),
            (4, 4),
            (0xffc, 4),
            (0xff8, 8),
            (u64::MAX, 8),
        ] {
            let mut b = vec![0xaau8; len];
            t.read(offset, &mut b);
            assert!(b.iter().all(|&x| x == 0), "{offset:#x}+{len}");
        }
        t.read(0, &mut []);
        assert!(read_u32(&mut t) >= 1_000_000);
    }

    #[test]
    fn saturates_at_u32_max() {
        let mut t = BootTimer::new(Instant::now());
        let slot = t.completion();
        slot.set(BootComplete {
            at: Instant::now(),
            elapsed: Duration::from_secs(5_000),
        });
        assert_eq!(read_u32(&mut t), u32::MAX);
    }
}
