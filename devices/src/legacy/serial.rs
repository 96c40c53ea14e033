//! COM1: an 8250/16550A UART built on vm-superio's `Serial`, with its output going to any
//! `Write` sink (terminal, file, pipe) and its input fed by the VMM through a 64-byte FIFO.
//! [`SharedBuffer`] is a sink that tests (and anyone wanting the console text) can read back.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::irq::EventFdTrigger;
use super::{ByteRegisters, UNCLAIMED};

/// Length of the UART's port range (eight registers at 0x3f8..0x3ff for COM1).
pub const SERIAL_LEN: u64 = 8;

/// The guest's output: anything that can be written to from a vCPU thread.
pub type SerialOutput = Box<dyn Write + Send>;

/// Serial events we act on: the guest drained the receive FIFO.
struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::debug!("serial: cannot signal an empty input FIFO: {e}");
        }
    }
}

/// The COM1 UART as a bus device.
///
/// Output bytes written by the guest to THR go to the sink and are flushed at once, so the
/// console is interactive. Input comes from [`SerialDevice::enqueue_input`]; when the FIFO is
/// full the VMM keeps the rest and tries again after [`SerialDevice::input_drained_event`]
/// becomes readable.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, InputDrained, SerialOutput>,
    /// Set after the first failed write to the sink, so a closed pipe logs one warning.
    output_failed: bool,
}

impl SerialDevice {
    /// A UART that raises its interrupt through `interrupt` and writes the guest's output to
    /// `out`. Fails only when the input-drained eventfd cannot be created.
    pub fn new(interrupt: EventFdTrigger, out: SerialOutput) -> io::Result<Self> {
        let drained = InputDrained(EventFd::new(EFD_NONBLOCK)?);
        Ok(Self {
            serial: Serial::with_events(interrupt, drained, out),
            output_failed: false,
        })
    }

    /// Hands `bytes` typed on the host to the guest, as much as fits in the receive FIFO.
    /// Returns how many bytes were taken (the first ones); the caller keeps the others for a
    /// later call. Nothing is taken while the guest holds the UART in loopback mode.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            // The bytes are in the FIFO; only the interrupt could not be raised.
            Err(SerialError::Trigger(e)) => {
                log::warn!("serial: cannot raise the receive interrupt: {e}");
                room
            }
            Err(e) => {
                log::debug!("serial: input not taken: {e}");
                0
            }
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Whether the receive FIFO is full (input must wait).
    pub fn is_fifo_full(&self) -> bool {
        self.serial.fifo_capacity() == 0
    }

    /// The eventfd to register as the irqfd of IRQ 4.
    pub fn interrupt_event(&self) -> &EventFd {
        self.serial.interrupt_evt().event_fd()
    }

    /// An eventfd that becomes readable whenever the guest has read the receive FIFO empty:
    /// the moment to retry input that did not fit. The reader must consume it (`read`).
    pub fn input_drained_event(&self) -> &EventFd {
        &self.serial.events().0
    }
}

impl ByteRegisters for SerialDevice {
    fn read_reg(&mut self, offset: u64) -> u8 {
        match u8::try_from(offset) {
            Ok(o) if u64::from(o) < SERIAL_LEN => self.serial.read(o),
            _ => UNCLAIMED,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        let o = match u8::try_from(offset) {
            Ok(o) if u64::from(o) < SERIAL_LEN => o,
            _ => {
                log::debug!("serial: write {value:#04x} at offset {offset:#x} ignored");
                return;
            }
        };
        match self.serial.write(o, value) {
            Ok(()) => self.output_failed = false,
            Err(SerialError::IOError(e)) => {
                if !self.output_failed {
                    log::warn!("serial: cannot write guest output: {e}");
                    self.output_failed = true;
                }
            }
            Err(e) => log::warn!("serial: {e}"),
        }
    }
}

/// A `Write` sink over a shared byte vector: clone it, give one clone to the UART, read the
/// console text from the other.
#[derive(Clone, Default, Debug)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Everything written so far, leaving the buffer empty.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    fn serial() -> (SerialDevice, SharedBuffer) {
        let out = SharedBuffer::new();
        let dev = SerialDevice::new(
            EventFdTrigger::new().expect("eventfd"),
            Box::new(out.clone()),
        )
        .expect("serial");
        (dev, out)
    }

    fn rd(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    fn irqs(dev: &SerialDevice) -> u64 {
        dev.interrupt_event().read().unwrap_or(0)
    }

    #[test]
    fn output_reaches_the_sink() {
        let (mut dev, out) = serial();
        for &b in b"hello\n" {
            dev.write(THR, &[b]);
        }
        assert_eq!(out.contents(), b"hello\n");
        assert_eq!(out.take(), b"hello\n");
        assert!(out.contents().is_empty());
    }

    #[test]
    fn transmit_interrupt_when_enabled() {
        let (mut dev, _out) = serial();
        dev.write(IER, &[0x02]);
        assert_eq!(
            irqs(&dev),
            1,
            "enabling THRE with an empty THR raises at once"
        );
        assert_eq!(rd(&mut dev, IIR) & 0x0f, 0x02);
        dev.write(THR, b"x");
        assert_eq!(irqs(&dev), 1);
    }

    #[test]
    fn input_respects_the_fifo_and_raises_rx_interrupts() {
        let (mut dev, _out) = serial();
        dev.write(IER, &[0x01]);
        assert_eq!(irqs(&dev), 0);
        assert_eq!(dev.fifo_capacity(), 64);
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(dev.enqueue_input(&input), 64);
        assert!(dev.is_fifo_full());
        assert_eq!(dev.enqueue_input(&input[64..]), 0);
        assert_eq!(dev.enqueue_input(&[]), 0);
        assert_eq!(irqs(&dev), 1);
        assert_eq!(rd(&mut dev, LSR) & 0x01, 0x01, "data ready");
        for i in 0..64u8 {
            assert_eq!(rd(&mut dev, THR), i);
        }
        assert_eq!(rd(&mut dev, LSR) & 0x01, 0);
        assert!(dev.input_drained_event().read().expect("drained") >= 1);
        assert_eq!(dev.enqueue_input(&input[64..]), 36);
        assert_eq!(dev.fifo_capacity(), 28);
        assert_eq!(rd(&mut dev, THR), 64);
    }

    #[test]
    fn loopback_takes_no_host_input() {
        let (mut dev, out) = serial();
        dev.write(MCR, &[0x10]);
        assert_eq!(dev.enqueue_input(b"abc"), 0);
        dev.write(THR, b"z");
        assert_eq!(rd(&mut dev, THR), b'z');
        assert!(out.contents().is_empty());
    }

    #[test]
    fn registers_and_divisor_latch() {
        let (mut dev, _out) = serial();
        dev.write(SCR, &[0x5a]);
        assert_eq!(rd(&mut dev, SCR), 0x5a);
        dev.write(LCR, &[0x83]);
        dev.write(0, &[0x01]);
        dev.write(1, &[0x00]);
        assert_eq!(rd(&mut dev, 0), 0x01);
        dev.write(LCR, &[0x03]);
        assert_eq!(rd(&mut dev, LCR), 0x03);
        assert_eq!(rd(&mut dev, LSR) & 0x60, 0x60, "transmitter always empty");
    }

    #[test]
    fn wide_and_hostile_accesses_do_not_panic() {
        let (mut dev, out) = serial();
        // A 2-byte write at offset 6 touches MSR (ignored) and SCR.
        dev.write(6, &[0xaa, 0x77]);
        assert_eq!(rd(&mut dev, SCR), 0x77);
        let mut wide = [0u8; 8];
        dev.read(0, &mut wide);
        assert_eq!(wide[7], 0x77);
        dev.read(7, &mut wide);
        assert_eq!(wide[0], 0x77);
        assert_eq!(&wide[1..], &[UNCLAIMED; 7]);
        dev.read(u64::MAX, &mut wide);
        assert_eq!(wide, [UNCLAIMED; 8]);
        dev.write(u64::MAX, &[1, 2, 3, 4, 5, 6, 7, 8]);
        dev.write(8, &[0x41]);
        dev.read(3, &mut []);
        dev.write(3, &[]);
        assert!(out.contents().is_empty());
        // A 4-byte write at THR: the first byte goes out, the others land in IER/FCR/LCR.
        dev.write(THR, &[b'A', 0, 0, 0x03]);
        assert_eq!(out.contents(), b"A");
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn broken_sink_is_survived() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().expect("eventfd"), Box::new(Broken))
            .expect("serial");
        dev.write(THR, b"a");
        dev.write(THR, b"b");
        assert!(dev.output_failed);
    }
}
