//! Ending the run: the exit device (a one-byte write to port 0xf4 ends the run with that exit
//! status), an i8042 reset (0xfe to port 0x64), or ACPI S5 (soft off) through the sleep control
//! register that the ACPI tables name. Either way the VMM stops the VM; the probe only spins
//! with `pause` afterwards (`hlt` is not allowed in ring 3). Or it writes nothing
//! (`probe.exit=hang`): the probe waits in `wait`'s polling loop instead, until the VMM is
//! stopped from outside or Ctrl+Alt+Del makes it reset.

use crate::acpi::{SleepRegister, S5};
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
    /// Power off through ACPI S5. Where and what to write comes from the ACPI tables, which
    /// [`end`] does not read: the caller finds them ([`crate::acpi::find_s5`]) and calls
    /// [`poweroff`].
    Poweroff,
    /// End nothing: the caller waits (`wait::wait`) until the VMM is stopped from outside
    /// (killed, or its `--timeout`) or Ctrl+Alt+Del asks for [`Ending::Reset`]; given to
    /// [`end`], it spins.
    Hang,
}

/// Ends the run as `ending` says. `Ending::Poweroff` needs the tables (see [`poweroff`]); given
/// here, without them, it ends the run with status 1.
pub fn end(ending: Ending) -> ! {
    match ending {
        // SAFETY: the exit device and the i8042 only end the run; they touch no memory.
        Ending::Status(status) => unsafe { io::outb(EXIT_PORT, status) },
        // SAFETY: as above.
        Ending::Reset => unsafe { io::outb(I8042_COMMAND_PORT, I8042_RESET) },
        // SAFETY: as above.
        Ending::Poweroff => unsafe { io::outb(EXIT_PORT, 1) },
        Ending::Hang => {}
    }
    spin()
}

/// Powers off through ACPI S5: writes ((SLP_TYPa << 2) & 0x1c) | SLP_EN, one byte, to the
/// sleep control register, as an OS does on a hardware-reduced ACPI platform.
pub fn poweroff(s5: &S5) -> ! {
    let value = s5.sleep_control_value();
    match s5.sleep_control {
        // SAFETY: the FADT names this port as the sleep control register; writing SLP_EN to it
        // asks the platform to power off, which touches no memory the probe relies on.
        SleepRegister::Io(port) => unsafe { io::outb(port, value) },
        SleepRegister::Memory(addr) => {
            // SAFETY: `SleepRegister::from_gas` only accepts addresses in the 32-bit MMIO hole
            // (0xc0000000..4 GiB), which the start code's page tables identity-map
            // user-accessible and uncached, and where no Rust object lives; the FADT names this
            // byte as the sleep control register. A byte write needs no alignment.
            unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
        }
    }
    spin()
}

/// Waits for the VMM to stop the VM.
fn spin() -> ! {
    loop {
        core::hint::spin_loop();
    }
}
