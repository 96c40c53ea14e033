//! The PS/2 keyboard behind the i8042 controller, polled (no IRQ 1: the probe takes no
//! interrupts), and a recogniser of Ctrl+Alt+Del in its scan codes, for the waiting loop of
//! `probe.exit=hang` (see `wait`).
//!
//! The controller: status at port 0x64 (bit 0: a byte waits in the output buffer; bit 5: it
//! came from the aux (mouse) port), the byte at port 0x60. The probe never configures the
//! controller or the keyboard, so it gets what the power-on state sends: set 1, translated by
//! the controller from the keyboard's set 2 (cgvm's default; command byte bit 6). A controller
//! with translation off sends set 2 itself. Which one is not asked (that would take controller
//! commands whose replies mix with the scan codes): [`CtrlAltDel`] decodes every byte as set 1
//! and as set 2 at once, each decoder tracking the make and break codes of the Ctrl, Alt and
//! Delete keys as a keyboard driver does, and fires when Delete goes down while a Ctrl and an
//! Alt are down in either set. The key codes involved do not overlap between the sets (set 1:
//! Ctrl 0x1d, Alt 0x38, Delete 0xe0 0x53, breaks with bit 7 set; set 2: Ctrl 0x14, Alt 0x11,
//! Delete 0xe0 0x71, breaks after 0xf0), so the sequence in one set does not move the other
//! set's decoder, and bytes of neither (replies such as ACK 0xfa, other keys) change nothing.
//! Set 3 (only after the guest selects it with keyboard command 0xf0, which the probe never
//! sends) is not decoded.
//!
//! As in Linux's default keymap, either Ctrl, either Alt, and Delete or keypad Delete (keypad
//! '.') count; the Pause key's 0xe1 sequence (which contains a Ctrl code) is skipped.

use crate::io;

/// i8042 data port: scan codes and replies.
pub const DATA_PORT: u16 = 0x60;
/// i8042 status port (reads; writes are controller commands).
pub const STATUS_PORT: u16 = 0x64;
/// Status: a byte waits in the output buffer.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Status: the byte waiting came from the aux (mouse) port.
const STATUS_AUX_DATA: u8 = 1 << 5;
/// Most bytes taken in one poll (the controller's queue holds 16).
const MAX_BYTES_PER_POLL: usize = 32;

/// Takes the bytes waiting in the i8042's output buffer and feeds the keyboard's to `keys`.
/// True as soon as they complete Ctrl+Alt+Del (the bytes after it are left in the buffer).
pub fn poll(keys: &mut CtrlAltDel) -> bool {
    for _ in 0..MAX_BYTES_PER_POLL {
        // SAFETY: reading the i8042's status and data ports only takes bytes out of its
        // output buffer; the controller cannot access memory.
        let status = unsafe { io::inb(STATUS_PORT) };
        if status & STATUS_OUTPUT_FULL == 0 {
            return false;
        }
        // SAFETY: as above.
        let byte = unsafe { io::inb(DATA_PORT) };
        if status & STATUS_AUX_DATA == 0 && keys.feed(byte) {
            return true;
        }
    }
    false
}

/// The keys the recogniser follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    LeftCtrl,
    RightCtrl,
    LeftAlt,
    RightAlt,
    Delete,
    KeypadDelete,
    /// Any other key.
    Other,
}

impl Key {
    /// Its bit in [`Held`].
    fn bit(self) -> u8 {
        match self {
            Self::LeftCtrl => 1 << 0,
            Self::RightCtrl => 1 << 1,
            Self::LeftAlt => 1 << 2,
            Self::RightAlt => 1 << 3,
            Self::Delete => 1 << 4,
            Self::KeypadDelete => 1 << 5,
            Self::Other => 0,
        }
    }
}

/// Which of the followed keys are down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Held(u8);

impl Held {
    const CTRL: u8 = 0b0000_0011;
    const ALT: u8 = 0b0000_1100;

    /// Applies a key going down (`pressed`) or up; true when it is a Delete going down while a
    /// Ctrl and an Alt are down.
    fn apply(&mut self, key: Key, pressed: bool) -> bool {
        if pressed {
            self.0 |= key.bit();
        } else {
            self.0 &= !key.bit();
        }
        pressed
            && matches!(key, Key::Delete | Key::KeypadDelete)
            && self.0 & Self::CTRL != 0
            && self.0 & Self::ALT != 0
    }
}

/// Prefix byte: an extended key's code follows (both sets).
const PREFIX_EXTENDED: u8 = 0xe0;
/// Prefix byte: the Pause key's sequence follows (both sets).
const PREFIX_PAUSE: u8 = 0xe1;
/// Set 2 prefix byte: a break code follows.
const SET2_BREAK: u8 = 0xf0;

/// Scan code set 1: a key's make code, or with bit 7 set its break code; extended keys after
/// 0xe0.
#[derive(Debug, Default)]
struct Set1 {
    extended: bool,
    /// After 0xe1: the next code is the Pause sequence's Ctrl, not a key.
    pause: bool,
    held: Held,
}

impl Set1 {
    fn feed(&mut self, byte: u8) -> bool {
        match byte {
            PREFIX_EXTENDED => {
                self.extended = true;
                return false;
            }
            PREFIX_PAUSE => {
                self.pause = true;
                return false;
            }
            _ => {}
        }
        let extended = core::mem::take(&mut self.extended);
        if core::mem::take(&mut self.pause) {
            return false;
        }
        let key = match (extended, byte & 0x7f) {
            (false, 0x1d) => Key::LeftCtrl,
            (true, 0x1d) => Key::RightCtrl,
            (false, 0x38) => Key::LeftAlt,
            (true, 0x38) => Key::RightAlt,
            (true, 0x53) => Key::Delete,
            (false, 0x53) => Key::KeypadDelete,
            _ => Key::Other,
        };
        self.held.apply(key, byte & 0x80 == 0)
    }
}

/// Scan code set 2: a key's make code, its break code after 0xf0; extended keys after 0xe0
/// (0xe0 0xf0 CODE for their break).
#[derive(Debug, Default)]
struct Set2 {
    extended: bool,
    release: bool,
    /// After 0xe1: the next code is the Pause sequence's Ctrl, not a key.
    pause: bool,
    held: Held,
}

impl Set2 {
    fn feed(&mut self, byte: u8) -> bool {
        match byte {
            PREFIX_EXTENDED => {
                self.extended = true;
                return false;
            }
            SET2_BREAK => {
                self.release = true;
                return false;
            }
            PREFIX_PAUSE => {
                self.pause = true;
                return false;
            }
            _ => {}
        }
        let extended = core::mem::take(&mut self.extended);
        let release = core::mem::take(&mut self.release);
        if core::mem::take(&mut self.pause) {
            return false;
        }
        let key = match (extended, byte) {
            (false, 0x14) => Key::LeftCtrl,
            (true, 0x14) => Key::RightCtrl,
            (false, 0x11) => Key::LeftAlt,
            (true, 0x11) => Key::RightAlt,
            (true, 0x71) => Key::Delete,
            (false, 0x71) => Key::KeypadDelete,
            _ => Key::Other,
        };
        self.held.apply(key, !release)
    }
}

/// Recognises Ctrl+Alt+Del in the keyboard's bytes, in scan code set 1 or 2 (module docs).
#[derive(Debug, Default)]
pub struct CtrlAltDel {
    set1: Set1,
    set2: Set2,
}

impl CtrlAltDel {
    /// A recogniser with no key down.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next byte from the keyboard; true when it completes Ctrl+Alt+Del (Delete
    /// going down while a Ctrl and an Alt are down).
    pub fn feed(&mut self, byte: u8) -> bool {
        // Both decoders see every byte.
        let in_set1 = self.set1.feed(byte);
        let in_set2 = self.set2.feed(byte);
        in_set1 || in_set2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// What cgvm's i8042 queues for Ctrl+Alt+Del (devices/src/legacy/i8042.rs): translated
    /// set 1, and set 2 with translation off.
    const CGVM_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
    const CGVM_SET2: &[u8] = &[
        0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
    ];
    /// The same in set 3, which the recogniser does not decode.
    const CGVM_SET3: &[u8] = &[0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];

    /// No byte fires.
    const NEVER: [usize; 0] = [];

    /// The indexes of the bytes at which a fresh recogniser fires.
    fn fires(bytes: &[u8]) -> Vec<usize> {
        let mut r = CtrlAltDel::new();
        bytes
            .iter()
            .enumerate()
            .filter(|&(_, &b)| r.feed(b))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn cgvm_sequences_fire_once_at_the_delete_press() {
        assert_eq!(fires(CGVM_SET1), [3]);
        assert_eq!(fires(CGVM_SET2), [3]);
        assert_eq!(fires(CGVM_SET3), NEVER);
        // Twice in a row (the controller queues 16 bytes: two set-1 sequences fit).
        let twice = [CGVM_SET1, CGVM_SET1].concat();
        assert_eq!(fires(&twice), [3, 11]);
        let twice = [CGVM_SET2, CGVM_SET2].concat();
        assert_eq!(fires(&twice), [3, 14]);
        // One set after the other, with the same recogniser.
        let both = [CGVM_SET1, CGVM_SET2, CGVM_SET1].concat();
        assert_eq!(fires(&both), [3, 11, 22]);
    }

    #[test]
    fn either_ctrl_either_alt_and_keypad_delete() {
        // Set 1: right Ctrl (e0 1d), right Alt (e0 38), keypad Delete (53).
        assert_eq!(fires(&[0xe0, 0x1d, 0xe0, 0x38, 0x53]), [4]);
        assert_eq!(fires(&[0x38, 0xe0, 0x1d, 0xe0, 0x53]), [4], "Alt first");
        // Set 2: right Ctrl (e0 14), right Alt (e0 11), keypad Delete (71).
        assert_eq!(fires(&[0xe0, 0x14, 0xe0, 0x11, 0x71]), [4]);
        assert_eq!(fires(&[0x11, 0x14, 0xe0, 0x71]), [3], "Alt first");
        // Typematic repeat of Delete fires again, like pressing it again.
        assert_eq!(fires(&[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0x53]), [3, 5]);
    }

    #[test]
    fn interleaved_junk_is_ignored() {
        // Set 1 with replies (ACK 0xfa, BAT 0xaa, echo 0xee, resend 0xfe), other keys (A down
        // 0x1e and up 0x9e, extended Home e0 47) and overrun codes (0x00, 0xff) in between.
        let set1 = [
            0xfa, 0x1d, 0x1e, 0xaa, 0x9e, 0x38, 0x00, 0xe0, 0x47, 0xe0, 0xc7, 0xee, 0xfe, 0xff,
            0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d,
        ];
        assert_eq!(fires(&set1), [15]);
        // Set 2 with the same replies, A (1c, f0 1c) and extended Home (e0 6c, e0 f0 6c).
        let set2 = [
            0xfa, 0x14, 0x1c, 0xf0, 0x1c, 0xaa, 0x11, 0xe0, 0x6c, 0xe0, 0xf0, 0x6c, 0xee, 0xfe,
            0x00, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
        ];
        assert_eq!(fires(&set2), [16]);
        // Nothing but junk, and every single byte alone.
        assert_eq!(
            fires(&[0xfa, 0xaa, 0xee, 0xfe, 0x00, 0xff, 0x1e, 0x9e]),
            NEVER
        );
        for b in 0..=255u8 {
            assert_eq!(fires(&[b]), NEVER, "{b:#04x}");
        }
    }

    #[test]
    fn releases_are_tracked() {
        // Set 1: Ctrl released before Delete.
        assert_eq!(fires(&[0x1d, 0x38, 0x9d, 0xe0, 0x53]), NEVER);
        // Alt released before Delete.
        assert_eq!(fires(&[0x1d, 0x38, 0xb8, 0xe0, 0x53]), NEVER);
        // Released and pressed again.
        assert_eq!(fires(&[0x1d, 0x38, 0xb8, 0x38, 0xe0, 0x53]), [5]);
        // Delete going up (e0 d3) does not fire, nor does a Delete already down when the
        // modifiers come.
        assert_eq!(fires(&[0xe0, 0x53, 0x1d, 0x38, 0xe0, 0xd3]), NEVER);
        // Left Ctrl down, right Ctrl up: the left one still counts.
        assert_eq!(fires(&[0x1d, 0xe0, 0x9d, 0x38, 0xe0, 0x53]), [5]);
        // After a whole sequence, Delete alone does nothing.
        let again = [CGVM_SET1, &[0xe0, 0x53]].concat();
        assert_eq!(fires(&again), [3]);

        // Set 2: Ctrl released (f0 14) before Delete.
        assert_eq!(fires(&[0x14, 0x11, 0xf0, 0x14, 0xe0, 0x71]), NEVER);
        // Alt released (f0 11).
        assert_eq!(fires(&[0x14, 0x11, 0xf0, 0x11, 0xe0, 0x71]), NEVER);
        // Right Alt released (e0 f0 11) while the left one is down.
        assert_eq!(
            fires(&[0x14, 0x11, 0xe0, 0x11, 0xe0, 0xf0, 0x11, 0xe0, 0x71]),
            [8]
        );
        // Delete going up (e0 f0 71).
        assert_eq!(fires(&[0x14, 0x11, 0xe0, 0xf0, 0x71]), NEVER);
        let again = [CGVM_SET2, &[0xe0, 0x71]].concat();
        assert_eq!(fires(&again), [3]);
    }

    #[test]
    fn pause_key_is_not_a_ctrl() {
        // Pause in set 1 (e1 1d 45 e1 9d c5) and set 2 (e1 14 77 e1 f0 14 f0 77) carries a Ctrl
        // code; with Alt down, a Delete after it must not fire.
        let set1 = [0x38, 0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5, 0xe0, 0x53];
        assert_eq!(fires(&set1), NEVER);
        let set1_held = [0x38, 0xe1, 0x1d, 0x45, 0xe0, 0x53];
        assert_eq!(fires(&set1_held), NEVER);
        let set2 = [
            0x11, 0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77, 0xe0, 0x71,
        ];
        assert_eq!(fires(&set2), NEVER);
        // A real Ctrl held across a Pause still counts.
        let set1 = [0x1d, 0x38, 0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5, 0xe0, 0x53];
        assert_eq!(fires(&set1), [9]);
        let set2 = [
            0x14, 0x11, 0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77, 0xe0, 0x71,
        ];
        assert_eq!(fires(&set2), [11]);
    }
}
