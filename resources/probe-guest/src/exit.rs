//! Ending the run: the exit device (a one-byte write to port 0xf4 ends the run with that exit
//! status) or an i8042 reset (0xfe to port 0x64). Either way the VMM stops the VM; the probe
//! only spins with `pause` afterwards (`hlt` is not allowed in ring 3).

use crate::io;

/// Exit device: a one-byte write V makes the VMM exit with status V.
pub const EXIT_PORT: u16 = 0xf4;
/// i8042 command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 command: pulse the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;

/// How the probe ends the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Write this status to the exit device.
    Status(u8),
    /// Reset through the i8042.
    Reset,
}

/// Ends the run as `ending` says.
pub fn end(ending: Ending) -> ! {
    match ending {
        // SAFETY: the exit device and the i8042 only end the run; they touch no memory.
        Ending::Status(status) => unsafe { io::outb(EXIT_PORT, status) },
        // SAFETY: as above.
        Ending::Reset => unsafe { io::outb(I8042_COMMAND_PORT, I8042_RESET) },
    }
    loop {
        core::hint::spin_loop();
    }
}
