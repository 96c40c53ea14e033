//! The CMOS RTC/NVRAM (index port 0x70, data port 0x71), and the memory sizes a PC firmware
//! (and QEMU, and cgvm) leaves there.

use crate::io;

/// CMOS index port.
const CMOS_INDEX: u16 = 0x70;
/// CMOS data port.
const CMOS_DATA: u16 = 0x71;

/// Memory between 16 MiB and the top of RAM below 4 GiB, in 64 KiB units: low byte.
pub const REG_MEM_ABOVE_16M_LOW: u8 = 0x34;
/// ... high byte.
pub const REG_MEM_ABOVE_16M_HIGH: u8 = 0x35;
/// Memory above 4 GiB in 64 KiB units (24 bits): low, middle and high bytes.
pub const REG_MEM_ABOVE_4G: [u8; 3] = [0x5b, 0x5c, 0x5d];

/// Reads CMOS register `reg` (0..=0x7f; bit 7 of the index, the NMI mask, is left clear).
pub fn read(reg: u8) -> u8 {
    // SAFETY: the RTC/NVRAM's index and data ports are plain device state, no memory access.
    unsafe {
        io::outb(CMOS_INDEX, reg & 0x7f);
        io::inb(CMOS_DATA)
    }
}

/// The memory size registers, raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize {
    /// Registers 0x34/0x35: 64 KiB units between 16 MiB and the top of RAM below 4 GiB (capped
    /// at 0xffff).
    pub above_16m_64k: u16,
    /// Registers 0x5b..0x5d: 64 KiB units of RAM above 4 GiB.
    pub above_4g_64k: u32,
}

impl MemorySize {
    /// Value of registers 0x34/0x35 that means "this much or more".
    pub const ABOVE_16M_CAP: u16 = 0xffff;

    /// Reads the registers.
    pub fn read() -> Self {
        let above_16m_64k =
            u16::from_le_bytes([read(REG_MEM_ABOVE_16M_LOW), read(REG_MEM_ABOVE_16M_HIGH)]);
        let [a, b, c] = REG_MEM_ABOVE_4G;
        let above_4g_64k = u32::from_le_bytes([read(a), read(b), read(c), 0]);
        Self {
            above_16m_64k,
            above_4g_64k,
        }
    }
}
