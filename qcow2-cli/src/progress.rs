//! QEMU's simple progress printer (`util/qemu-progress.c`) as qemu-img's `-p` uses it:
//! "    (P/100%)\r" on stdout with two decimals, printed when the value moved by more than
//! the minimum step since the last print, or is exactly 0 or 100; a newline at the end.

/// A progress line on stdout; a disabled one prints nothing.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// `qemu_progress_init(enabled, min_skip)` (qemu-img uses a step of 1.0).
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// `qemu_progress_print(value, 0)`: sets the progress to `value` percent.
    pub fn set(&mut self, value: f32) {
        let current = value.clamp(0.0, 100.0);
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            self.print();
        }
    }

    /// Sets the progress to `done / total` (100% for an empty total).
    pub fn set_ratio(&mut self, done: u64, total: u64) {
        if total == 0 {
            self.set(100.0);
        } else {
            self.set((100.0 * done as f64 / total as f64) as f32);
        }
    }

    fn print(&self) {
        if self.enabled {
            // As QEMU's printf + fflush: through the stdio buffer, which it empties.
            crate::stdio::out(&format!("    ({:3.2}/100%)\r", self.current));
            crate::stdio::flush();
        }
    }

    /// `qemu_progress_end`: the final newline.
    pub fn end(&self) {
        if self.enabled {
            crate::stdio::out("\n");
            crate::stdio::flush();
        }
    }
}
