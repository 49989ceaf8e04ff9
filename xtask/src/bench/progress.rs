//! A progress bar on stderr: one line redrawn in place on a terminal, one line per step
//! otherwise (CI logs). Steps carry an expected weight in seconds, so the bar and the
//! time left follow the plan rather than the step count.

use std::{
    io::{IsTerminal as _, Write as _},
    time::Instant,
};

/// The bar.
#[derive(Debug)]
pub struct Progress {
    total: f64,
    done: f64,
    current: f64,
    started: Instant,
    tty: bool,
    quiet: bool,
    drawn: bool,
}

const WIDTH: usize = 28;

impl Progress {
    /// A bar for `total` expected seconds of work.
    pub fn new(total: f64) -> Self {
        Self {
            total: total.max(1.0),
            done: 0.0,
            current: 0.0,
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet: false,
            drawn: false,
        }
    }

    /// A bar that prints nothing (tests).
    #[cfg(test)]
    pub fn quiet() -> Self {
        Self {
            quiet: true,
            ..Self::new(1.0)
        }
    }

    /// Starts a step expected to take `weight` seconds (the previous one is done).
    pub fn begin(&mut self, label: &str, weight: f64) {
        self.done += self.current;
        self.current = weight;
        if self.quiet {
            return;
        }
        let line = self.line(label);
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            self.drawn = true;
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    /// Prints a message above the bar.
    pub fn note(&mut self, msg: &str) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
        let _ = writeln!(err, "! {msg}");
    }

    /// Ends the bar with a last line.
    pub fn finish(&mut self, msg: &str) {
        self.done = self.total;
        self.current = 0.0;
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
        let elapsed = fmt_duration(self.started.elapsed().as_secs_f64());
        let _ = writeln!(err, "✓ {msg} in {elapsed}");
    }

    fn line(&self, label: &str) -> String {
        let fraction = (self.done / self.total).clamp(0.0, 1.0);
        let filled = (fraction * WIDTH as f64).round() as usize;
        let elapsed = self.started.elapsed().as_secs_f64();
        // Scale the plan's estimate by how fast the run has gone so far, once enough
        // has been done for that pace to mean something.
        let left = if fraction >= 0.1 {
            (self.total - self.done).max(0.0) * elapsed / self.done
        } else {
            self.total
        };
        format!(
            "[{}{}] {:>3.0}% {} left · {label}",
            "█".repeat(filled),
            "░".repeat(WIDTH - filled),
            fraction * 100.0,
            fmt_duration(left),
        )
    }
}

/// `1m05s`, `42s`.
pub fn fmt_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_fraction_and_label() {
        let mut p = Progress::quiet();
        p.total = 100.0;
        p.begin("a", 50.0);
        p.begin("b", 50.0);
        let line = p.line("b");
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.ends_with("· b"), "{line}");
        assert_eq!(fmt_duration(65.0), "1m05s");
        assert_eq!(fmt_duration(9.4), "9s");
    }
}
