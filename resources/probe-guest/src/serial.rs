//! COM1, the 8250 UART at I/O port 0x3f8: the probe's console output, and the register access
//! the boot check uses to test the device.
//!
//! Output polls the line status register before each byte, with a bounded wait so that a UART
//! that never drains cannot hang the probe, and turns "\n" into "\r\n". `println!` formats into
//! it directly (no buffering, no allocation).

use core::fmt;

use crate::io;

/// Base I/O port of COM1.
pub const COM1: u16 = 0x3f8;

/// Transmit holding register (write) / receive buffer register (read).
pub const REG_DATA: u16 = 0;
/// Interrupt enable register.
pub const REG_IER: u16 = 1;
/// Line control register.
pub const REG_LCR: u16 = 3;
/// Modem control register.
pub const REG_MCR: u16 = 4;
/// Line status register.
pub const REG_LSR: u16 = 5;
/// Scratch register.
pub const REG_SCRATCH: u16 = 7;

/// LSR: a received byte is waiting in the receive buffer.
pub const LSR_DATA_READY: u8 = 1 << 0;
/// LSR: the transmit holding register is empty.
pub const LSR_THR_EMPTY: u8 = 1 << 5;
/// MCR: loopback mode (transmitted bytes come back on the receive side).
pub const MCR_LOOPBACK: u8 = 1 << 4;
/// LCR: 8 data bits, no parity, 1 stop bit, divisor latch off.
const LCR_8N1: u8 = 0x03;

/// How many LSR polls to wait for the transmitter before sending anyway.
const TX_POLL_LIMIT: u32 = 100_000;

/// Reads UART register `reg` (an offset from the base, 0..=7).
pub fn read_reg(reg: u16) -> u8 {
    // SAFETY: COM1's registers are plain device state; the UART cannot access memory.
    unsafe { io::inb(COM1 + (reg & 7)) }
}

/// Writes UART register `reg` (an offset from the base, 0..=7).
pub fn write_reg(reg: u16, value: u8) {
    // SAFETY: COM1's registers are plain device state; the UART cannot access memory.
    unsafe { io::outb(COM1 + (reg & 7), value) }
}

/// Puts the UART in a known state for polled output: no interrupts, 8N1, divisor untouched.
pub fn init() {
    write_reg(REG_IER, 0);
    write_reg(REG_LCR, LCR_8N1);
}

/// Sends one byte as is.
pub fn write_byte(byte: u8) {
    for _ in 0..TX_POLL_LIMIT {
        if read_reg(REG_LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    write_reg(REG_DATA, byte);
}

/// Sends `bytes`, turning each "\n" into "\r\n".
pub fn write_bytes(bytes: &[u8]) {
    for &byte in bytes {
        if byte == b'\n' {
            write_byte(b'\r');
        }
        write_byte(byte);
    }
}

/// The console as a [`fmt::Write`] sink.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats to COM1 (output errors cannot happen: the console drops nothing it can report).
pub fn print(args: fmt::Arguments<'_>) {
    // Console::write_str never fails, so neither does write_fmt.
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// `println!` for the probe: formats a line to COM1.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
