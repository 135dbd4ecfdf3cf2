//! What a command is doing, said on a terminal while it does it.

use std::io::Write;

/// One line on a terminal's stderr saying what a command is doing ("waiting for ARP reply from
/// 10.244.0.19 on debug eth0… 200 ms"), rewritten in place, gone when the result prints. Off when
/// stderr is not a terminal or the output is JSON.
pub struct Progress {
    on: bool,
    shown: bool,
    last: Option<std::time::Instant>,
}

impl Progress {
    pub fn new(on: bool) -> Progress {
        Progress { on, shown: false, last: None }
    }

    /// Shows `msg` (at most ten times a second).
    pub fn say(&mut self, msg: &str) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100)) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{msg}");
        let _ = e.flush();
        self.shown = true;
    }

    pub fn clear(&mut self) {
        if self.shown {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
            self.shown = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}
