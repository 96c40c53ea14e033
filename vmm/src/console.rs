//! The serial console on the user's terminal: raw mode while the guest runs (restored on
//! every way out, panics included), and the Ctrl-A escape: Ctrl-A x quits, Ctrl-A Ctrl-A
//! sends one Ctrl-A to the guest.

use std::sync::Mutex;

/// The byte that starts an escape sequence (Ctrl-A).
pub const ESCAPE: u8 = 0x01;

/// What the user typed, after escape handling.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Bytes for the guest.
    pub to_guest: Vec<u8>,
    /// The user asked to quit (Ctrl-A x).
    pub quit: bool,
}

/// Tracks a Ctrl-A across reads.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    /// Runs `input` through the escape state machine.
    pub fn feed(&mut self, input: &[u8]) -> Filtered {
        let mut out = Filtered::default();
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => {
                        out.quit = true;
                        return out;
                    }
                    ESCAPE => out.to_guest.push(ESCAPE),
                    other => out.to_guest.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending_escape = true;
            } else {
                out.to_guest.push(b);
            }
        }
        out
    }
}

/// The terminal settings to put back, shared with the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Restores the terminal saved by [`RawTerminal::enter`], if any. Safe to call many times.
pub fn restore_terminal() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = saved {
        // SAFETY: tcsetattr reads the termios we pass; fd 0 is stdin, which was a TTY when
        // the settings were saved.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

/// Raw mode on stdin for as long as this lives.
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin in raw mode if it is a TTY; `None` otherwise. Installs a panic hook that
    /// restores the terminal first.
    pub fn enter() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the termios we own.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        let mut raw = t;
        // SAFETY: cfmakeraw edits the termios we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: tcsetattr reads the termios we pass.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        Some(Self(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ls\r").to_guest, b"ls\r");
        let r = f.feed(&[b'a', ESCAPE, ESCAPE, b'b']);
        assert_eq!(r.to_guest, vec![b'a', ESCAPE, b'b']);
        assert!(!r.quit);
        let r = f.feed(&[ESCAPE, b'c']);
        assert_eq!(r.to_guest, vec![ESCAPE, b'c']);
        let r = f.feed(&[b'z', ESCAPE]);
        assert_eq!(r.to_guest, b"z");
        let r = f.feed(b"x");
        assert!(r.quit, "escape state carries across reads");
        assert!(r.to_guest.is_empty());
    }
}
