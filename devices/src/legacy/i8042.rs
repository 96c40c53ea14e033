//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (command/status), with a PS/2
//! keyboard behind it and no auxiliary (mouse) port.
//!
//! It models enough for Linux's i8042 and atkbd drivers to probe it quickly and quietly, for
//! the CPU reset line (command 0xfe) and for [`I8042Device::trigger_ctrl_alt_del`].
//!
//! The controller's output buffer is a queue: the byte at its head is the one the guest reads
//! from 0x60, and IRQ 1 gets one edge each time a byte reaches the head while the command
//! byte's keyboard-interrupt bit is set (as the real IRQ line goes low on a read and high again
//! when the next byte is loaded).
//!
//! Scan codes: with the command byte's translation bit set (the default, and what Linux keeps)
//! the guest sees translated set 1; with it clear it sees the keyboard's own set (1, 2 or 3,
//! default 2, changed by keyboard command 0xf0). Translation is modelled for set 2 only.
//!
//! There is no aux port: the aux loopback command 0xd3 returns its byte as keyboard data (no
//! aux-data status bit), the aux interface test 0xa9 answers 0x01, so Linux's `i8042_check_aux`
//! gives up at once instead of waiting for timeouts; bytes for the aux device (0xd4) are
//! dropped.

use std::collections::VecDeque;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::irq::EventFdTrigger;
use super::{ByteRegisters, UNCLAIMED};
use crate::stop::{GuestStop, StopNotifier};

/// Length of the port range: insert one device at 0x60 covering 0x60..0x65 (data at offset 0,
/// command/status at offset 4; offsets 1..3 read as unclaimed ports and ignore writes).
pub const I8042_LEN: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register.
const SR_OBF: u8 = 0x01;
const SR_SYS: u8 = 0x04;
const SR_CMD: u8 = 0x08;
/// Keyboard inhibit switch: 1 = not inhibited (keylock off).
const SR_UNLOCKED: u8 = 0x10;

// Command byte (controller RAM byte 0).
const CB_KBD_INT: u8 = 0x01;
const CB_SYS: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_AUX_DISABLE: u8 = 0x20;
const CB_XLATE: u8 = 0x40;
/// Keyboard interrupt on, system flag, aux disabled, translation on.
const DEFAULT_COMMAND_BYTE: u8 = CB_KBD_INT | CB_SYS | CB_AUX_DISABLE | CB_XLATE;

// Output port: bit 0 is the CPU reset line (0 = reset), bit 1 the A20 gate.
const OUTPORT_RESET: u8 = 0x01;
const DEFAULT_OUTPORT: u8 = OUTPORT_RESET | 0x02;

// Controller commands.
const CMD_READ_RAM: u8 = 0x20;
const CMD_READ_RAM_LAST: u8 = 0x3f;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_WRITE_RAM_LAST: u8 = 0x7f;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_READ_TEST_INPUTS: u8 = 0xe0;
const CMD_PULSE_FIRST: u8 = 0xf0;

// Controller replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// "Clock line stuck low": what an empty aux connector reports.
const AUX_ABSENT: u8 = 0x01;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: u8 = 0xab;
/// Second ID byte of an MF2 keyboard, untranslated and translated.
const KBD_ID2_RAW: u8 = 0x83;
const KBD_ID2_XLATED: u8 = 0x41;
/// How the translated set numbers read back (0xf0 0x00 with translation on).
const XLATED_SET: [u8; 3] = [0x43, 0x41, 0x3f];

/// Ctrl, Alt, Del pressed then released, in translated set 1 (what Linux sees by default).
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same in set 2.
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// The same in set 3.
const CTRL_ALT_DEL_SET3: &[u8] = &[0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];

/// Bytes the output queue holds, like the 16-byte buffer of a keyboard; more are dropped.
/// Linux's i8042 driver flushes at most this many bytes before calling the controller stuck.
const QUEUE_CAPACITY: usize = 16;

/// A controller command waiting for its data byte on port 0x60.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingWrite {
    Ram(usize),
    Outport,
    KbdOutbuf,
    AuxOutbuf,
    Aux,
}

/// The i8042 controller and its keyboard, as a bus device of length [`I8042_LEN`] at 0x60.
pub struct I8042Device {
    interrupt: EventFdTrigger,
    stop: StopNotifier,
    /// Controller RAM; byte 0 is the command byte.
    ram: [u8; 32],
    outport: u8,
    /// The last write went to the command port (status bit 3).
    last_was_command: bool,
    pending: Option<PendingWrite>,
    queue: VecDeque<u8>,
    /// What port 0x60 reads when the queue is empty: the last byte read.
    last_data: u8,
    /// The IRQ 1 level we last signalled (output buffer full and interrupt enabled).
    irq_level: bool,
    kbd: Keyboard,
}

/// The PS/2 keyboard behind the controller.
#[derive(Debug)]
struct Keyboard {
    scanning: bool,
    scancode_set: u8,
    /// A keyboard command waiting for its parameter byte.
    awaiting_param: Option<u8>,
}

impl Default for Keyboard {
    fn default() -> Self {
        Self {
            scanning: true,
            scancode_set: 2,
            awaiting_param: None,
        }
    }
}

impl I8042Device {
    /// A controller that raises IRQ 1 through `interrupt` and asks `stop` for
    /// [`GuestStop::Reset`] when the guest pulses the reset line.
    pub fn new(interrupt: EventFdTrigger, stop: StopNotifier) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = DEFAULT_COMMAND_BYTE;
        Self {
            interrupt,
            stop,
            ram,
            outport: DEFAULT_OUTPORT,
            last_was_command: false,
            pending: None,
            queue: VecDeque::with_capacity(QUEUE_CAPACITY),
            last_data: 0,
            irq_level: false,
            kbd: Keyboard::default(),
        }
    }

    /// The eventfd to register as the irqfd of IRQ 1.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event_fd()
    }

    /// Queues the scan codes of Ctrl+Alt+Del pressed and released, in the code set the guest
    /// sees (translated set 1 by default). IRQ 1 fires for each byte as it reaches the output
    /// buffer. Returns false, queuing nothing, when the keyboard is disabled (command 0xf5) or
    /// the queue has no room for the whole sequence.
    pub fn trigger_ctrl_alt_del(&mut self) -> bool {
        if !self.kbd.scanning {
            log::warn!("i8042: keyboard disabled by the guest; Ctrl+Alt+Del not sent");
            return false;
        }
        let seq = if self.command_byte() & CB_XLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            match self.kbd.scancode_set {
                1 => CTRL_ALT_DEL_SET1,
                3 => CTRL_ALT_DEL_SET3,
                _ => CTRL_ALT_DEL_SET2,
            }
        };
        if QUEUE_CAPACITY - self.queue.len() < seq.len() {
            log::warn!("i8042: output queue full; Ctrl+Alt+Del not sent");
            return false;
        }
        self.push(seq);
        true
    }

    fn command_byte(&self) -> u8 {
        self.ram[0]
    }

    fn set_command_byte(&mut self, value: u8) {
        self.ram[0] = value;
        self.update_irq();
    }

    /// Appends bytes to the output queue (dropping what does not fit) and raises the IRQ if the
    /// output buffer just became full.
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.queue.len() < QUEUE_CAPACITY {
                self.queue.push_back(b);
            } else {
                log::debug!("i8042: output queue full, byte {b:#04x} dropped");
            }
        }
        self.update_irq();
    }

    /// Recomputes the IRQ 1 level and sends an edge when it rises.
    fn update_irq(&mut self) {
        let level = !self.queue.is_empty() && self.command_byte() & CB_KBD_INT != 0;
        if level && !self.irq_level {
            if let Err(e) = self.interrupt.trigger() {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
        self.irq_level = level;
    }

    fn status(&self) -> u8 {
        let mut s = SR_UNLOCKED;
        if !self.queue.is_empty() {
            s |= SR_OBF;
        }
        if self.command_byte() & CB_SYS != 0 {
            s |= SR_SYS;
        }
        if self.last_was_command {
            s |= SR_CMD;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.queue.pop_front() {
            self.last_data = b;
            // The line drops on the read and rises again if another byte is loaded.
            self.irq_level = false;
            self.update_irq();
        }
        self.last_data
    }

    fn reset_cpu(&mut self, how: &str) {
        log::info!("guest requested a reset through the i8042 ({how})");
        self.stop.request(GuestStop::Reset);
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.pending = None;
        match cmd {
            CMD_READ_RAM..=CMD_READ_RAM_LAST => {
                let byte = self.ram[usize::from(cmd - CMD_READ_RAM)];
                self.push(&[byte]);
            }
            CMD_WRITE_RAM..=CMD_WRITE_RAM_LAST => {
                self.pending = Some(PendingWrite::Ram(usize::from(cmd - CMD_WRITE_RAM)));
            }
            CMD_DISABLE_AUX => self.set_command_byte(self.command_byte() | CB_AUX_DISABLE),
            CMD_ENABLE_AUX => self.set_command_byte(self.command_byte() & !CB_AUX_DISABLE),
            CMD_TEST_AUX => self.push(&[AUX_ABSENT]),
            CMD_SELF_TEST => {
                self.ram[0] |= CB_SYS;
                self.push(&[SELF_TEST_OK]);
            }
            CMD_TEST_KBD => self.push(&[INTERFACE_OK]),
            CMD_DISABLE_KBD => self.set_command_byte(self.command_byte() | CB_KBD_DISABLE),
            CMD_ENABLE_KBD => self.set_command_byte(self.command_byte() & !CB_KBD_DISABLE),
            CMD_READ_INPUT_PORT => self.push(&[0x00]),
            CMD_READ_OUTPORT => self.push(&[self.outport]),
            CMD_WRITE_OUTPORT => self.pending = Some(PendingWrite::Outport),
            CMD_WRITE_KBD_OUTBUF => self.pending = Some(PendingWrite::KbdOutbuf),
            CMD_WRITE_AUX_OUTBUF => self.pending = Some(PendingWrite::AuxOutbuf),
            CMD_WRITE_AUX => self.pending = Some(PendingWrite::Aux),
            CMD_READ_TEST_INPUTS => self.push(&[0x00]),
            // Pulse output port lines for bits clear in the low nibble; bit 0 is reset.
            CMD_PULSE_FIRST..=0xff if cmd & OUTPORT_RESET == 0 => self.reset_cpu("command 0xfe"),
            CMD_PULSE_FIRST..=0xff => {}
            _ => log::debug!("i8042: controller command {cmd:#04x} ignored"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(PendingWrite::Ram(0)) => self.set_command_byte(value),
            Some(PendingWrite::Ram(i)) => {
                if let Some(r) = self.ram.get_mut(i) {
                    *r = value;
                }
            }
            Some(PendingWrite::Outport) => {
                self.outport = value;
                if value & OUTPORT_RESET == 0 {
                    self.reset_cpu("output port write");
                }
            }
            Some(PendingWrite::KbdOutbuf) | Some(PendingWrite::AuxOutbuf) => self.push(&[value]),
            Some(PendingWrite::Aux) => {
                log::debug!("i8042: byte {value:#04x} for the absent aux device dropped");
            }
            None => self.keyboard_command(value),
        }
    }

    /// A byte written to port 0x60 with no controller command pending goes to the keyboard.
    fn keyboard_command(&mut self, value: u8) {
        let xlate = self.command_byte() & CB_XLATE != 0;
        if let Some(cmd) = self.kbd.awaiting_param.take() {
            match cmd {
                KBD_SCANCODE_SET => match value {
                    0 => {
                        let set = self.kbd.scancode_set;
                        let reply = if xlate {
                            XLATED_SET[usize::from(set.clamp(1, 3) - 1)]
                        } else {
                            set
                        };
                        self.push(&[KBD_ACK, reply]);
                    }
                    1..=3 => {
                        self.kbd.scancode_set = value;
                        self.push(&[KBD_ACK]);
                    }
                    _ => self.push(&[KBD_RESEND]),
                },
                // LED state, typematic rate: accepted and forgotten.
                _ => self.push(&[KBD_ACK]),
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_SET_RATE | KBD_SCANCODE_SET => {
                self.kbd.awaiting_param = Some(value);
                self.push(&[KBD_ACK]);
            }
            KBD_ECHO => self.push(&[KBD_ECHO]),
            KBD_GET_ID => {
                let id2 = if xlate { KBD_ID2_XLATED } else { KBD_ID2_RAW };
                self.push(&[KBD_ACK, KBD_ID, id2]);
            }
            KBD_ENABLE => {
                self.kbd.scanning = true;
                self.push(&[KBD_ACK]);
            }
            KBD_DISABLE => {
                self.kbd.scanning = false;
                self.kbd.scancode_set = 2;
                self.push(&[KBD_ACK]);
            }
            KBD_DEFAULTS => {
                self.kbd.scancode_set = 2;
                self.push(&[KBD_ACK]);
            }
            KBD_RESET => {
                self.kbd = Keyboard::default();
                self.push(&[KBD_ACK, KBD_BAT_OK]);
            }
            // Everything else, resend included, is acknowledged.
            _ => self.push(&[KBD_ACK]),
        }
    }
}

impl ByteRegisters for I8042Device {
    fn read_reg(&mut self, offset: u64) -> u8 {
        match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => UNCLAIMED,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        match offset {
            DATA_OFFSET => self.write_data(value),
            COMMAND_OFFSET => self.write_command(value),
            _ => log::debug!("i8042: write {value:#04x} at offset {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn dev() -> (I8042Device, StopNotifier) {
        let stop = StopNotifier::new().expect("stop");
        let d = I8042Device::new(EventFdTrigger::new().expect("eventfd"), stop.clone());
        (d, stop)
    }

    fn status(d: &mut I8042Device) -> u8 {
        let mut b = [0u8];
        d.read(COMMAND_OFFSET, &mut b);
        b[0]
    }

    fn data(d: &mut I8042Device) -> u8 {
        let mut b = [0u8];
        d.read(DATA_OFFSET, &mut b);
        b[0]
    }

    fn cmd(d: &mut I8042Device, c: u8) {
        d.write(COMMAND_OFFSET, &[c]);
    }

    fn irqs(d: &I8042Device) -> u64 {
        d.interrupt_event().read().unwrap_or(0)
    }

    /// Polls the output buffer the way Linux's `i8042_command` does.
    fn reply(d: &mut I8042Device) -> Option<u8> {
        (status(d) & SR_OBF != 0).then(|| data(d))
    }

    #[test]
    fn command_0xfe_requests_reset() {
        let (mut d, stop) = dev();
        cmd(&mut d, 0xff);
        assert_eq!(stop.reason(), None, "0xff pulses nothing");
        cmd(&mut d, 0xfe);
        assert_eq!(stop.reason(), Some(GuestStop::Reset));
    }

    #[test]
    fn output_port_write_with_reset_bit_clear_resets() {
        let (mut d, stop) = dev();
        cmd(&mut d, CMD_READ_OUTPORT);
        assert_eq!(reply(&mut d), Some(DEFAULT_OUTPORT));
        cmd(&mut d, CMD_WRITE_OUTPORT);
        d.write(DATA_OFFSET, &[0x03]);
        assert_eq!(stop.reason(), None);
        cmd(&mut d, CMD_READ_OUTPORT);
        assert_eq!(reply(&mut d), Some(0x03));
        cmd(&mut d, CMD_WRITE_OUTPORT);
        d.write(DATA_OFFSET, &[0x02]);
        assert_eq!(stop.reason(), Some(GuestStop::Reset));
    }

    #[test]
    fn linux_controller_probe() {
        let (mut d, stop) = dev();
        let s = status(&mut d);
        assert_eq!(s & SR_OBF, 0, "nothing to flush");
        assert_ne!(s & SR_UNLOCKED, 0, "no keylock warning");
        cmd(&mut d, CMD_SELF_TEST);
        assert_ne!(status(&mut d) & SR_CMD, 0);
        assert_eq!(reply(&mut d), Some(0x55));
        cmd(&mut d, CMD_READ_RAM);
        assert_eq!(reply(&mut d), Some(DEFAULT_COMMAND_BYTE));
        assert_eq!(reply(&mut d), None);
        // Disable keyboard interface and interrupt, as i8042_controller_init does.
        let ctr = (DEFAULT_COMMAND_BYTE | CB_KBD_DISABLE) & !CB_KBD_INT;
        cmd(&mut d, CMD_WRITE_RAM);
        d.write(DATA_OFFSET, &[ctr]);
        assert_eq!(status(&mut d) & SR_CMD, 0);
        assert_eq!(
            irqs(&d),
            2,
            "the two replies so far raised IRQ 1 (interrupt on)"
        );
        cmd(&mut d, CMD_READ_RAM);
        assert_eq!(reply(&mut d), Some(ctr));
        // No aux port: the loop byte comes back without the aux-data bit, the test fails.
        cmd(&mut d, CMD_WRITE_AUX_OUTBUF);
        d.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(status(&mut d) & 0x21, SR_OBF);
        assert_eq!(data(&mut d), 0x5a);
        cmd(&mut d, CMD_TEST_AUX);
        assert_eq!(reply(&mut d), Some(AUX_ABSENT));
        cmd(&mut d, CMD_TEST_KBD);
        assert_eq!(reply(&mut d), Some(0x00));
        cmd(&mut d, CMD_ENABLE_AUX);
        cmd(&mut d, CMD_READ_RAM);
        assert_eq!(reply(&mut d).map(|c| c & CB_AUX_DISABLE), Some(0));
        cmd(&mut d, CMD_DISABLE_AUX);
        cmd(&mut d, CMD_ENABLE_KBD);
        cmd(&mut d, CMD_READ_RAM);
        let c = reply(&mut d).expect("ctr");
        assert_eq!(c & (CB_AUX_DISABLE | CB_KBD_DISABLE), CB_AUX_DISABLE);
        cmd(&mut d, CMD_DISABLE_KBD);
        cmd(&mut d, CMD_READ_RAM);
        assert_eq!(
            reply(&mut d).map(|c| c & CB_KBD_DISABLE),
            Some(CB_KBD_DISABLE)
        );
        // Other RAM bytes.
        cmd(&mut d, CMD_WRITE_RAM + 5);
        d.write(DATA_OFFSET, &[0x99]);
        cmd(&mut d, CMD_READ_RAM + 5);
        assert_eq!(reply(&mut d), Some(0x99));
        assert_eq!(irqs(&d), 0, "keyboard interrupt off since the CTR write");
        assert_eq!(stop.reason(), None);
    }

    #[test]
    fn keyboard_commands_are_acked_with_interrupts() {
        let (mut d, _stop) = dev();
        // Default command byte has the keyboard interrupt on.
        d.write(DATA_OFFSET, &[KBD_DISABLE]);
        assert_eq!(irqs(&d), 1);
        assert_eq!(data(&mut d), KBD_ACK);
        d.write(DATA_OFFSET, &[KBD_GET_ID]);
        assert_eq!(irqs(&d), 1);
        assert_eq!(data(&mut d), KBD_ACK);
        assert_eq!(irqs(&d), 1, "next byte loaded");
        assert_eq!(data(&mut d), KBD_ID);
        assert_eq!(irqs(&d), 1);
        assert_eq!(data(&mut d), KBD_ID2_XLATED);
        assert_eq!(irqs(&d), 0);
        assert_eq!(status(&mut d) & SR_OBF, 0);
        assert_eq!(
            data(&mut d),
            KBD_ID2_XLATED,
            "empty buffer re-reads the last byte"
        );
        d.write(DATA_OFFSET, &[KBD_RESET]);
        assert_eq!(data(&mut d), KBD_ACK);
        assert_eq!(data(&mut d), KBD_BAT_OK);
        d.write(DATA_OFFSET, &[KBD_SET_LEDS]);
        assert_eq!(data(&mut d), KBD_ACK);
        d.write(DATA_OFFSET, &[0x07]);
        assert_eq!(data(&mut d), KBD_ACK);
        d.write(DATA_OFFSET, &[KBD_SCANCODE_SET]);
        d.write(DATA_OFFSET, &[0]);
        assert_eq!(data(&mut d), KBD_ACK);
        assert_eq!(data(&mut d), KBD_ACK);
        assert_eq!(data(&mut d), 0x41, "set 2 as seen through translation");
        d.write(DATA_OFFSET, &[KBD_ECHO]);
        assert_eq!(data(&mut d), KBD_ECHO);
        d.write(DATA_OFFSET, &[0x42]);
        assert_eq!(data(&mut d), KBD_ACK, "unknown commands acked");
    }

    #[test]
    fn ctrl_alt_del_is_readable_byte_by_byte_with_interrupts() {
        let (mut d, stop) = dev();
        assert!(d.trigger_ctrl_alt_del());
        let mut got = Vec::new();
        while status(&mut d) & SR_OBF != 0 {
            assert_eq!(irqs(&d), 1, "one edge per byte");
            got.push(data(&mut d));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        assert_eq!(irqs(&d), 0);
        assert_eq!(stop.reason(), None);
    }

    #[test]
    fn ctrl_alt_del_untranslated_and_interrupt_enable() {
        let (mut d, _stop) = dev();
        // Translation and interrupt off.
        cmd(&mut d, CMD_WRITE_RAM);
        d.write(DATA_OFFSET, &[CB_SYS]);
        assert!(d.trigger_ctrl_alt_del());
        assert_eq!(irqs(&d), 0);
        // Enabling the interrupt with data pending raises it.
        cmd(&mut d, CMD_WRITE_RAM);
        d.write(DATA_OFFSET, &[CB_SYS | CB_KBD_INT]);
        assert_eq!(irqs(&d), 1);
        let got: Vec<u8> = std::iter::from_fn(|| reply(&mut d)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        d.write(DATA_OFFSET, &[KBD_SCANCODE_SET]);
        d.write(DATA_OFFSET, &[3]);
        d.write(DATA_OFFSET, &[KBD_SCANCODE_SET]);
        d.write(DATA_OFFSET, &[0]);
        let got: Vec<u8> = std::iter::from_fn(|| reply(&mut d)).collect();
        assert_eq!(got, [KBD_ACK, KBD_ACK, KBD_ACK, KBD_ACK, 3]);
        assert!(d.trigger_ctrl_alt_del());
        let got: Vec<u8> = std::iter::from_fn(|| reply(&mut d)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET3);
    }

    #[test]
    fn ctrl_alt_del_refused_when_disabled_or_full() {
        let (mut d, _stop) = dev();
        assert!(d.trigger_ctrl_alt_del());
        assert!(d.trigger_ctrl_alt_del(), "8 + 8 bytes fit");
        assert!(!d.trigger_ctrl_alt_del(), "nothing after");
        let got: Vec<u8> = std::iter::from_fn(|| reply(&mut d)).collect();
        assert_eq!(got.len(), 16);
        d.write(DATA_OFFSET, &[KBD_DISABLE]);
        assert_eq!(reply(&mut d), Some(KBD_ACK));
        assert!(!d.trigger_ctrl_alt_del());
        d.write(DATA_OFFSET, &[KBD_ENABLE]);
        assert_eq!(reply(&mut d), Some(KBD_ACK));
        assert!(d.trigger_ctrl_alt_del());
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (mut d, stop) = dev();
        let mut b = [0u8; 8];
        d.read(4, &mut b);
        assert_eq!(b[0] & SR_UNLOCKED, SR_UNLOCKED);
        assert_eq!(&b[1..], &[UNCLAIMED; 7]);
        d.read(1, &mut b[..2]);
        assert_eq!(&b[..2], &[UNCLAIMED; 2]);
        d.read(u64::MAX, &mut b);
        d.write(u64::MAX, &[0xfe; 8]);
        d.write(1, &[0xfe, 0xfe]);
        assert_eq!(stop.reason(), None, "0xfe to 0x61/0x62 is not a reset");
        d.read(0, &mut []);
        d.write(0, &[]);
        for c in 0..=0xfdu8 {
            if c & 0xf0 == 0xf0 && c & 1 == 0 {
                continue;
            }
            cmd(&mut d, c);
            d.write(DATA_OFFSET, &[0xff]);
            d.read(0, &mut b);
        }
        assert_eq!(stop.reason(), None);
        // A 4-byte write at 0x64 issues the command in its low byte.
        d.write(4, &[0xfe, 0, 0, 0]);
        assert_eq!(stop.reason(), Some(GuestStop::Reset));
    }
}
