//! The CMOS RTC (MC146818) and its 128 bytes of NVRAM at ports 0x70 (index) and 0x71 (data),
//! including the PC/QEMU memory-size registers that firmware-less guests cross-check with e820.
//!
//! The clock reads the host's wall clock (UTC) on every access to a time register. Guest
//! writes to the time registers (seconds, minutes, hours, weekday, day, month, year, century)
//! are ignored: the guest cannot set the host's time and we keep no offset. There is no
//! periodic, alarm or update interrupt (IRQ 8 is not wired); the alarm registers are plain
//! storage. Status register A's update-in-progress bit always reads 0.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{ByteRegisters, UNCLAIMED};

/// Length of the port range: index at offset 0 (0x70), data at offset 1 (0x71).
pub const CMOS_LEN: u64 = 2;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
/// Bit 7 of the index port disables NMIs; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;
const CMOS_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) is read-only and never set.
const DEFAULT_A: u8 = 0x26;
const A_UIP: u8 = 0x80;
/// 24-hour mode, BCD.
const DEFAULT_B: u8 = B_24H;
const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;
/// Valid RAM and time.
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

// Memory-size registers (PC BIOS / QEMU convention).
const REG_BASE_MEM_LO: usize = 0x15;
const REG_EXT_MEM_LO: usize = 0x17;
const REG_EXT_MEM2_LO: usize = 0x30;
const REG_HIGH_MEM_LO: usize = 0x34;
const REG_ABOVE_4G: usize = 0x5b;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const UNIT_64K: u64 = 64 * KIB;

/// Where the host time comes from: seconds since the Unix epoch.
type Clock = fn() -> u64;

fn host_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The RTC + NVRAM as a bus device of length [`CMOS_LEN`] at 0x70.
pub struct CmosDevice {
    index: u8,
    nvram: [u8; CMOS_SIZE],
    clock: Clock,
}

impl CmosDevice {
    /// A CMOS whose memory-size registers describe `ram_below_4g` bytes of RAM from address 0
    /// and `ram_above_4g` bytes from 4 GiB.
    ///
    /// - 0x15/0x16: base memory in KiB, 640 (less if RAM is smaller);
    /// - 0x17/0x18 and 0x30/0x31: KiB above 1 MiB, at most 0xffff;
    /// - 0x34/0x35: 64 KiB units above 16 MiB, at most 0xffff;
    /// - 0x5b/0x5c/0x5d: 64 KiB units above 4 GiB, 24 bits, at most 0xff_ffff.
    ///
    /// All 16-bit and 24-bit values are little endian.
    pub fn new(ram_below_4g: u64, ram_above_4g: u64) -> Self {
        let mut nvram = [0u8; CMOS_SIZE];
        nvram[usize::from(REG_A)] = DEFAULT_A;
        nvram[usize::from(REG_B)] = DEFAULT_B;
        nvram[usize::from(REG_D)] = D_VRT;

        let base_kib = (ram_below_4g / KIB).min(640);
        let ext_kib = (ram_below_4g.saturating_sub(MIB) / KIB).min(0xffff);
        let high_64k = (ram_below_4g.saturating_sub(16 * MIB) / UNIT_64K).min(0xffff);
        let above_64k = (ram_above_4g / UNIT_64K).min(0xff_ffff);
        put_le(&mut nvram, REG_BASE_MEM_LO, base_kib, 2);
        put_le(&mut nvram, REG_EXT_MEM_LO, ext_kib, 2);
        put_le(&mut nvram, REG_EXT_MEM2_LO, ext_kib, 2);
        put_le(&mut nvram, REG_HIGH_MEM_LO, high_64k, 2);
        put_le(&mut nvram, REG_ABOVE_4G, above_64k, 3);

        Self {
            index: 0,
            nvram,
            clock: host_clock,
        }
    }

    fn reg_b(&self) -> u8 {
        self.nvram[usize::from(REG_B)]
    }

    /// A clock value as the guest sees it: BCD unless register B says binary.
    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn hours(&self, h: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.encode(h);
        }
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        let pm = if h >= 12 { HOUR_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn read_register(&self, index: u8) -> u8 {
        let time = || civil_time((self.clock)());
        match index {
            REG_SECONDS => self.encode(time().second),
            REG_MINUTES => self.encode(time().minute),
            REG_HOURS => self.hours(time().hour),
            REG_WEEKDAY => self.encode(time().weekday),
            REG_DAY => self.encode(time().day),
            REG_MONTH => self.encode(time().month),
            REG_YEAR => self.encode((time().year % 100) as u8),
            REG_CENTURY => self.encode((time().year / 100 % 100) as u8),
            REG_A => self.nvram[usize::from(REG_A)] & !A_UIP,
            // No interrupt flags are ever raised.
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.nvram.get(usize::from(index)).copied().unwrap_or(0),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                log::debug!("cmos: write {value:#04x} to time register {index:#04x} ignored");
            }
            REG_A => self.nvram[usize::from(REG_A)] = value & !A_UIP,
            REG_C | REG_D => log::debug!("cmos: write to read-only register {index:#04x} ignored"),
            _ => {
                if let Some(b) = self.nvram.get_mut(usize::from(index)) {
                    *b = value;
                }
            }
        }
    }
}

impl ByteRegisters for CmosDevice {
    fn read_reg(&mut self, offset: u64) -> u8 {
        match offset {
            // The index register is write-only.
            INDEX_OFFSET => UNCLAIMED,
            DATA_OFFSET => self.read_register(self.index),
            _ => UNCLAIMED,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            DATA_OFFSET => self.write_register(self.index, value),
            _ => log::debug!("cmos: write {value:#04x} at offset {offset:#x} ignored"),
        }
    }
}

/// Stores the low `len` bytes of `value` at `at`, low byte first.
fn put_le(nvram: &mut [u8; CMOS_SIZE], at: usize, value: u64, len: usize) {
    for (i, b) in value.to_le_bytes().iter().take(len).enumerate() {
        if let Some(slot) = nvram.get_mut(at + i) {
            *slot = *b;
        }
    }
}

/// A UTC calendar time, in the RTC's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: u64,
    month: u8,
    day: u8,
    /// 1 = Sunday .. 7 = Saturday.
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Converts seconds since 1970-01-01T00:00:00Z to a proleptic Gregorian date and time.
fn civil_time(unix_secs: u64) -> CivilTime {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
    let weekday = ((days + 4) % 7) as u8 + 1;

    // Count from 0000-03-01 so that the leap day ends each 4/100/400-year cycle.
    let days_from_0000_03_01 = days + 719_468;
    let era = days_from_0000_03_01 / 146_097;
    let day_of_era = days_from_0000_03_01 % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 0 = March .. 11 = February.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u8;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);

    CivilTime {
        year,
        month: month as u8,
        day,
        weekday,
        hour: (secs / 3_600) as u8,
        minute: (secs / 60 % 60) as u8,
        second: (secs % 60) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    const GIB: u64 = 1 << 30;

    fn get(d: &mut CmosDevice, index: u8) -> u8 {
        d.write(INDEX_OFFSET, &[index]);
        let mut b = [0u8];
        d.read(DATA_OFFSET, &mut b);
        b[0]
    }

    fn set(d: &mut CmosDevice, index: u8, value: u8) {
        d.write(INDEX_OFFSET, &[index]);
        d.write(DATA_OFFSET, &[value]);
    }

    fn le(d: &mut CmosDevice, index: u8, len: u8) -> u64 {
        (0..len).fold(0, |acc, i| acc | u64::from(get(d, index + i)) << (8 * i))
    }

    struct Mem {
        base: u64,
        ext: u64,
        ext2: u64,
        high: u64,
        above: u64,
    }

    fn mem(below: u64, above: u64) -> Mem {
        let mut d = CmosDevice::new(below, above);
        Mem {
            base: le(&mut d, 0x15, 2),
            ext: le(&mut d, 0x17, 2),
            ext2: le(&mut d, 0x30, 2),
            high: le(&mut d, 0x34, 2),
            above: le(&mut d, 0x5b, 3),
        }
    }

    #[test]
    fn memory_registers_256m() {
        let m = mem(256 * MIB, 0);
        assert_eq!(m.base, 640);
        assert_eq!(m.ext, 0xffff);
        assert_eq!(m.ext2, 0xffff);
        assert_eq!(m.high, (256 - 16) * 16);
        assert_eq!(m.above, 0);
    }

    #[test]
    fn memory_registers_3g_plus_1g_above_4g() {
        let m = mem(3 * GIB, GIB);
        assert_eq!(m.base, 640);
        assert_eq!(m.ext, 0xffff);
        assert_eq!(m.high, 0xbf00);
        assert_eq!(m.above, 0x4000);
        let mut d = CmosDevice::new(3 * GIB, GIB);
        assert_eq!(
            [get(&mut d, 0x5b), get(&mut d, 0x5c), get(&mut d, 0x5d)],
            [0, 0x40, 0]
        );
    }

    #[test]
    fn memory_registers_16m() {
        let m = mem(16 * MIB, 0);
        assert_eq!(m.base, 640);
        assert_eq!(m.ext, 15 * 1024);
        assert_eq!(m.ext2, 15 * 1024);
        assert_eq!(m.high, 0);
        assert_eq!(m.above, 0);
    }

    #[test]
    fn memory_registers_tiny_and_huge() {
        let m = mem(512 * KIB, 0);
        assert_eq!(m.base, 512);
        assert_eq!((m.ext, m.high, m.above), (0, 0, 0));
        let m = mem(0, 0);
        assert_eq!((m.base, m.ext, m.high, m.above), (0, 0, 0, 0));
        let m = mem(3 * GIB, u64::MAX);
        assert_eq!(m.above, 0xff_ffff);
        let m = mem(u64::MAX, 0);
        assert_eq!((m.base, m.ext, m.high), (640, 0xffff, 0xffff));
    }

    /// 2024-02-29T13:05:09Z, a Thursday.
    fn leap_day_afternoon() -> u64 {
        1_709_211_909
    }

    fn fixed() -> CmosDevice {
        let mut d = CmosDevice::new(256 * MIB, 0);
        d.clock = leap_day_afternoon;
        d
    }

    #[test]
    fn time_in_bcd_24h_by_default() {
        let mut d = fixed();
        assert_eq!(get(&mut d, REG_B), 0x02);
        assert_eq!(get(&mut d, REG_SECONDS), 0x09);
        assert_eq!(get(&mut d, REG_MINUTES), 0x05);
        assert_eq!(get(&mut d, REG_HOURS), 0x13);
        assert_eq!(get(&mut d, REG_WEEKDAY), 5);
        assert_eq!(get(&mut d, REG_DAY), 0x29);
        assert_eq!(get(&mut d, REG_MONTH), 0x02);
        assert_eq!(get(&mut d, REG_YEAR), 0x24);
        assert_eq!(get(&mut d, REG_CENTURY), 0x20);
    }

    #[test]
    fn time_in_binary_and_12h() {
        let mut d = fixed();
        set(&mut d, REG_B, B_24H | B_BINARY);
        assert_eq!(get(&mut d, REG_B), 0x06);
        assert_eq!(get(&mut d, REG_HOURS), 13);
        assert_eq!(get(&mut d, REG_DAY), 29);
        assert_eq!(get(&mut d, REG_YEAR), 24);
        assert_eq!(get(&mut d, REG_CENTURY), 20);
        set(&mut d, REG_B, B_BINARY);
        assert_eq!(get(&mut d, REG_HOURS), 0x80 | 1, "1 PM");
        set(&mut d, REG_B, 0);
        assert_eq!(get(&mut d, REG_HOURS), 0x80 | 0x01);
        d.clock = || 1_709_164_800; // 2024-02-29T00:00:00Z: 12 AM
        assert_eq!(get(&mut d, REG_HOURS), 0x12);
        d.clock = || 1_709_164_800 + 12 * 3600; // noon: 12 PM
        assert_eq!(get(&mut d, REG_HOURS), 0x80 | 0x12);
    }

    #[test]
    fn civil_time_known_dates() {
        let t = civil_time(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        let t = civil_time(951_782_400); // 2000-02-29T00:00:00Z, Tuesday
        assert_eq!((t.year, t.month, t.day, t.weekday), (2000, 2, 29, 3));
        let t = civil_time(4_107_542_399); // 2100-02-28T23:59:59Z, Sunday
        assert_eq!((t.year, t.month, t.day, t.weekday), (2100, 2, 28, 1));
        assert_eq!((t.hour, t.minute, t.second), (23, 59, 59));
        let t = civil_time(4_107_542_400); // 2100 is not a leap year
        assert_eq!((t.year, t.month, t.day), (2100, 3, 1));
        let t = civil_time(1_735_689_599); // 2024-12-31T23:59:59Z
        assert_eq!((t.year, t.month, t.day), (2024, 12, 31));
        let _ = civil_time(u64::MAX);
    }

    #[test]
    fn host_clock_reads_plausibly() {
        let mut d = CmosDevice::new(256 * MIB, 0);
        assert!(get(&mut d, REG_CENTURY) >= 0x20);
        let month = get(&mut d, REG_MONTH);
        assert!((0x01..=0x12).contains(&month));
    }

    #[test]
    fn status_registers_and_nvram() {
        let mut d = fixed();
        assert_eq!(get(&mut d, REG_A), 0x26);
        set(&mut d, REG_A, 0xa6);
        assert_eq!(get(&mut d, REG_A), 0x26, "UIP never reads set");
        assert_eq!(get(&mut d, REG_C), 0);
        set(&mut d, REG_C, 0xff);
        assert_eq!(get(&mut d, REG_C), 0);
        assert_eq!(get(&mut d, REG_D), 0x80);
        set(&mut d, REG_D, 0);
        assert_eq!(get(&mut d, REG_D), 0x80);
        // NMI-disable bit masked off the index.
        set(&mut d, 0x80 | 0x40, 0x5a);
        assert_eq!(get(&mut d, 0x40), 0x5a);
        set(&mut d, 0x7f, 0x11);
        assert_eq!(get(&mut d, 0x7f), 0x11);
        // Alarm registers are storage; time writes are ignored.
        set(&mut d, 0x01, 0x30);
        assert_eq!(get(&mut d, 0x01), 0x30);
        set(&mut d, REG_SECONDS, 0x59);
        assert_eq!(get(&mut d, REG_SECONDS), 0x09);
        set(&mut d, REG_CENTURY, 0x19);
        assert_eq!(get(&mut d, REG_CENTURY), 0x20);
    }

    #[test]
    fn wide_and_hostile_accesses() {
        let mut d = fixed();
        // outw 0x70: index in the low byte, data in the high byte.
        d.write(INDEX_OFFSET, &[0x50, 0xab]);
        assert_eq!(get(&mut d, 0x50), 0xab);
        let mut b = [0u8; 8];
        d.write(INDEX_OFFSET, &[REG_D]);
        d.read(INDEX_OFFSET, &mut b);
        assert_eq!(
            b,
            [UNCLAIMED, 0x80, UNCLAIMED, UNCLAIMED, UNCLAIMED, UNCLAIMED, UNCLAIMED, UNCLAIMED]
        );
        d.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0x80);
        d.read(u64::MAX, &mut b);
        d.write(u64::MAX, &[0xff; 8]);
        d.write(2, &[0xff; 8]);
        d.read(0, &mut []);
        for i in 0..=0xffu8 {
            d.write(INDEX_OFFSET, &[i]);
            d.write(DATA_OFFSET, &[0xff]);
            d.read(DATA_OFFSET, &mut b[..4]);
        }
    }
}
