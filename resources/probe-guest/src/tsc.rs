//! Time for bounded waits: the time-stamp counter (`rdtsc`, allowed in ring 3 because the start
//! code clears CR4.TSD) and its rate.
//!
//! The rate comes from CPUID where the CPU or hypervisor states it (leaf 0x15: crystal clock
//! and ratio; leaf 0x16: base MHz; leaf 0x4000_0010: the TSC kHz some hypervisors publish),
//! else from timing 10 ms of PIT channel 2 three times and keeping the median (the in-kernel
//! PIT, gated through port 0x61, as Linux's `pit_calibrate_tsc` does), else it is assumed to be 3 GHz. It is found once, on the
//! first [`Deadline`] (or [`ticks_per_ms`] call), and kept with where it came from
//! ([`rate_source`]). Deadlines use it (a timeout message's "N ms" is as good as the rate), and
//! the blkbench check, which converts elapsed ticks to nanoseconds ([`ticks_to_ns_at`]).

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

#[cfg(not(test))]
use crate::io;

/// TSC ticks per millisecond assumed when nothing says better.
const ASSUMED_TICKS_PER_MS: u64 = 3_000_000;
/// Plausible TSC rates, in ticks per millisecond (100 MHz .. 20 GHz).
const PLAUSIBLE: core::ops::RangeInclusive<u64> = 100_000..=20_000_000;

/// The PIT's input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// How long the PIT calibration counts, ms.
const PIT_CALIBRATION_MS: u64 = 10;
/// PIT channel 2 data port.
const PIT_CH2: u16 = 0x42;
/// PIT mode/command port.
const PIT_COMMAND: u16 = 0x43;
/// PIT command: channel 2, low byte then high byte, mode 0 (interrupt on terminal count),
/// binary.
const PIT_CH2_ONESHOT: u8 = 0xb0;
/// Port 0x61 (NMI status and control): bit 0 gates PIT channel 2, bit 1 enables the speaker,
/// bit 5 reads channel 2's output.
const PORT_61: u16 = 0x61;
const PORT_61_GATE2: u8 = 1 << 0;
const PORT_61_SPEAKER: u8 = 1 << 1;
const PORT_61_OUT2: u8 = 1 << 5;
/// Most polls of port 0x61 in the calibration (each one traps on a PVM host, ~50-100 µs).
const PIT_MAX_POLLS: u32 = 1_000_000;
/// Most TSC ticks the calibration waits for the PIT (more than 10 ms at any plausible rate).
const PIT_MAX_TICKS: u64 = 1 << 32;

/// The TSC rate once found (0: not yet).
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);
/// Where it came from (a [`RateSource`] as u8; meaningful once TICKS_PER_MS is set).
static SOURCE: AtomicU8 = AtomicU8::new(RateSource::Assumed as u8);

/// Where the TSC rate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RateSource {
    /// CPUID leaf 0x15 (crystal clock and ratio).
    CpuidTsc = 0,
    /// CPUID leaf 0x16 (base MHz).
    CpuidBase = 1,
    /// CPUID leaf 0x4000_0010 (a hypervisor's TSC kHz).
    Hypervisor = 2,
    /// Timed against PIT channel 2.
    Pit = 3,
    /// Nothing said: 3 GHz assumed.
    Assumed = 4,
}

impl RateSource {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::CpuidTsc,
            1 => Self::CpuidBase,
            2 => Self::Hypervisor,
            3 => Self::Pit,
            _ => Self::Assumed,
        }
    }
}

impl fmt::Display for RateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CpuidTsc => "cpuid 0x15",
            Self::CpuidBase => "cpuid 0x16",
            Self::Hypervisor => "cpuid 0x40000010",
            Self::Pit => "PIT",
            Self::Assumed => "assumed",
        })
    }
}

/// Reads the time-stamp counter.
pub fn now() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the counter into EDX:EAX; the start code cleared CR4.TSD, so it
    // does not fault in ring 3.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// TSC ticks per millisecond (found on the first call).
pub fn ticks_per_ms() -> u64 {
    match TICKS_PER_MS.load(Ordering::Relaxed) {
        0 => {
            let (rate, source) = measure();
            SOURCE.store(source as u8, Ordering::Relaxed);
            TICKS_PER_MS.store(rate, Ordering::Relaxed);
            rate
        }
        rate => rate,
    }
}

/// Where the TSC rate came from (found first if need be).
pub fn rate_source() -> RateSource {
    ticks_per_ms();
    RateSource::from_u8(SOURCE.load(Ordering::Relaxed))
}

/// `ticks` in nanoseconds at `ticks_per_ms` (saturating; 0 ticks per ms gives 0).
pub fn ticks_to_ns_at(ticks: u64, ticks_per_ms: u64) -> u64 {
    if ticks_per_ms == 0 {
        return 0;
    }
    let ns = u128::from(ticks) * 1_000_000 / u128::from(ticks_per_ms);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Finds the TSC rate, in ticks per millisecond, and where it came from: CPUID, else the PIT,
/// else assumed.
fn measure() -> (u64, RateSource) {
    from_cpuid()
        .filter(|(r, _)| PLAUSIBLE.contains(r))
        .or_else(|| {
            from_pit()
                .filter(|r| PLAUSIBLE.contains(r))
                .map(|r| (r, RateSource::Pit))
        })
        .unwrap_or((ASSUMED_TICKS_PER_MS, RateSource::Assumed))
}

/// CPUID leaf `leaf` (subleaf 0): EAX, EBX, ECX, EDX.
fn cpuid(leaf: u32) -> [u32; 4] {
    #[allow(unused_unsafe)]
    // SAFETY: `cpuid` exists on every x86-64 CPU and only writes registers.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, 0) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The TSC rate CPUID states, if any, and the leaf that states it.
fn from_cpuid() -> Option<(u64, RateSource)> {
    let max = cpuid(0)[0];
    if max >= 0x15 {
        let [denominator, numerator, crystal_hz, _] = cpuid(0x15);
        if denominator != 0 && numerator != 0 && crystal_hz != 0 {
            return Some((
                u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000,
                RateSource::CpuidTsc,
            ));
        }
    }
    if max >= 0x16 {
        let base_mhz = cpuid(0x16)[0] & 0xffff;
        if base_mhz != 0 {
            return Some((u64::from(base_mhz) * 1000, RateSource::CpuidBase));
        }
    }
    // Hypervisor leaves: 0x4000_0000 EAX is the highest; 0x4000_0010 EAX the TSC kHz.
    let hv = cpuid(0x4000_0000)[0];
    if (0x4000_0010..0x4000_0100).contains(&hv) {
        let khz = cpuid(0x4000_0010)[0];
        if khz != 0 {
            return Some((u64::from(khz), RateSource::Hypervisor));
        }
    }
    None
}

/// Host unit tests have no PIT to talk to.
#[cfg(test)]
fn from_pit() -> Option<u64> {
    None
}

/// How many PIT calibrations are made; their median is kept.
const PIT_RUNS: usize = 3;

/// The median of [`PIT_RUNS`] PIT calibrations. One run is skewed when the vCPU waits for a
/// host CPU inside its window (a late poll counts too many ticks, a late start too few); the
/// median of three survives one such run.
#[cfg(not(test))]
fn from_pit() -> Option<u64> {
    let mut rates = [0u64; PIT_RUNS];
    for r in rates.iter_mut() {
        *r = pit_once()?;
    }
    Some(median(rates))
}

/// The middle value.
fn median(mut v: [u64; PIT_RUNS]) -> u64 {
    v.sort_unstable();
    v[PIT_RUNS / 2]
}

/// Times [`PIT_CALIBRATION_MS`] of PIT channel 2 with the TSC.
#[cfg(not(test))]
fn pit_once() -> Option<u64> {
    let count = PIT_HZ * PIT_CALIBRATION_MS / 1000;
    // SAFETY: PIT channel 2 and port 0x61 are timer and speaker state; neither touches memory.
    // The speaker stays off, and port 0x61 is restored after.
    let saved = unsafe { io::inb(PORT_61) };
    // SAFETY: as above.
    unsafe {
        io::outb(PORT_61, (saved & !PORT_61_SPEAKER) | PORT_61_GATE2);
        io::outb(PIT_COMMAND, PIT_CH2_ONESHOT);
        io::outb(PIT_CH2, (count & 0xff) as u8);
        io::outb(PIT_CH2, (count >> 8) as u8);
    }
    let start = now();
    let mut ticks = None;
    for _ in 0..PIT_MAX_POLLS {
        // SAFETY: as above.
        let value = unsafe { io::inb(PORT_61) };
        let elapsed = now().wrapping_sub(start);
        if value & PORT_61_OUT2 != 0 {
            ticks = Some(elapsed);
            break;
        }
        if elapsed > PIT_MAX_TICKS {
            break;
        }
    }
    // SAFETY: as above.
    unsafe { io::outb(PORT_61, saved) };
    ticks.map(|t| t / PIT_CALIBRATION_MS)
}

/// A point in time to wait until.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: u64,
    ticks: u64,
    ms: u64,
}

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        let ticks = ticks_per_ms().saturating_mul(ms);
        Self {
            start: now(),
            ticks,
            ms,
        }
    }

    /// Whether the time is up.
    pub fn expired(&self) -> bool {
        now().wrapping_sub(self.start) >= self.ticks
    }

    /// The wait it was made for, in ms.
    pub fn ms(&self) -> u64 {
        self.ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_ignores_one_skewed_calibration() {
        assert_eq!(median([2_600_000, 4_340_000, 2_601_000]), 2_601_000);
        assert_eq!(median([1_000_000, 2_600_000, 2_600_500]), 2_600_000);
    }

    #[test]
    fn ticks_convert_to_ns() {
        assert_eq!(ticks_to_ns_at(3_000_000, 3_000_000), 1_000_000);
        assert_eq!(ticks_to_ns_at(2_596_124, 2_596_124), 1_000_000);
        assert_eq!(ticks_to_ns_at(1, 1_000_000), 1);
        assert_eq!(ticks_to_ns_at(5, 0), 0);
        assert_eq!(ticks_to_ns_at(u64::MAX, 1), u64::MAX);
        for v in 0..5 {
            assert_eq!(RateSource::from_u8(v) as u8, v);
        }
    }
}
