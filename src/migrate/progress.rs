//! Progress of a long step: an `indicatif` bar (keys/s, ETA) on a terminal; without
//! one (CI, logs) a plain line every `progress_interval_ms`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: Option<u64>,
    keys: u64,
    bytes: u64,
    start: Instant,
    last_line: Instant,
    interval: Duration,
}

impl Progress {
    /// `total`: keys expected, when known (the bar then shows an ETA).
    pub fn new(label: &str, total: Option<u64>, interval: Duration) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{prefix} [{bar:30}] {pos}/{len} keys  {per_sec}  ETA {eta}  {msg}"
            } else {
                "{prefix} {spinner} {pos} keys  {per_sec}  {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        let now = Instant::now();
        Progress { bar, label: label.to_string(), total, keys: 0, bytes: 0, start: now, last_line: now, interval }
    }

    /// Starts counting from keys already done (a resumed step).
    pub fn resume_at(&mut self, keys: u64) {
        self.keys = keys;
        if let Some(b) = &self.bar {
            b.set_position(keys);
            b.reset_eta();
        }
    }

    pub fn add(&mut self, keys: u64, bytes: u64) {
        self.keys += keys;
        self.bytes += bytes;
        if let Some(b) = &self.bar {
            b.set_position(self.keys);
            return;
        }
        if self.last_line.elapsed() >= self.interval {
            self.last_line = Instant::now();
            eprintln!("{}", self.line(""));
        }
    }

    /// A note next to the counts (the bar's message, or in the next line).
    pub fn note(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None if self.last_line.elapsed() >= self.interval => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line(msg));
            }
            None => {}
        }
    }

    fn line(&self, msg: &str) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = self.keys as f64 / secs;
        let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        format!("{}: {}{of} keys, {} ({rate:.0} keys/s) {msg}", self.label, self.keys, human_bytes(self.bytes))
    }

    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(3 << 30), "3.0 GiB");
    }
}
