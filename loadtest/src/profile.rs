//! CPU profiles of a benchmark's processes: `perf record` of one process over a
//! measured window, folded and drawn by `scripts/flamegraph.py` into
//! `<out>.svg` (a flamegraph) and `<out>.txt` (the heaviest functions, and the share
//! of a few groups of frames such as h2's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::Error;

/// How perf walks a sample's stack.
#[derive(Debug, Clone)]
pub enum Unwind {
    /// DWARF unwind tables (Rust binaries: etcdmux).
    Dwarf,
    /// Frame pointers, for a Go binary (etcd, etcd's grpc-proxy): Go keeps frame
    /// pointers, and Debian's etcd is stripped of its unwind tables. Its frames are
    /// named from the binary's own function table.
    Go { binary: PathBuf },
}

impl Unwind {
    /// How to unwind process `pid`: a Go binary (one with a `.gopclntab` section)
    /// by frame pointers, anything else by DWARF.
    pub fn of(pid: u32) -> Unwind {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if is_go(&exe) {
            Unwind::Go { binary: exe }
        } else {
            Unwind::Dwarf
        }
    }
}

/// Whether `path` is an ELF file with a `.gopclntab` section (`readelf -S`).
fn is_go(path: &Path) -> bool {
    Command::new("readelf")
        .arg("-SW")
        .arg(path)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(".gopclntab"))
}

/// Where `tool`'s folded stacks go: outside the repository, as they are large, but
/// kept for digging below what the flamegraph's summary shows.
pub fn folded_dir(tool: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{tool}-profiles"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// `perf record` of one process over a window.
pub struct Profile {
    child: Child,
    data: tempfile::NamedTempFile,
    unwind: Unwind,
}

impl Profile {
    /// Records `pid` for `secs` seconds at 499 samples a second (with its call stacks).
    pub fn start(pid: u32, secs: u64, unwind: Unwind) -> Result<Profile, Error> {
        let data = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", "499", "-g"]);
        if let Unwind::Dwarf = unwind {
            cmd.args(["--call-graph", "dwarf,16384"]);
        }
        let child = cmd
            .args(["-p", &pid.to_string(), "-o"])
            .arg(data.path())
            .args(["--", "sleep", &secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting perf (Debian: linux-perf): {e}"))?;
        Ok(Profile { child, data, unwind })
    }

    /// Ends the recording now (before its window is over): perf writes what it has.
    pub fn stop(&self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill only sends a signal, to the perf process this owns.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
    }

    /// Waits for the recording, then folds and draws it into `out`.{svg,txt}; with
    /// `folded`, the folded stacks go there too (they are large).
    pub async fn finish(mut self, out: &str, title: &str, folded: Option<&Path>) -> Result<(), Error> {
        let (out, title, folded) = (out.to_string(), title.to_string(), folded.map(Path::to_path_buf));
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            self.child.wait()?;
            let script =
                Command::new("perf").args(["script", "-i"]).arg(self.data.path()).stderr(Stdio::null()).output()?;
            let mut draw = Command::new("python3");
            draw.args(["scripts/flamegraph.py", "--title", &title]);
            match &folded {
                Some(path) => draw.arg("--folded-to").arg(path),
                None => draw.arg("--no-folded"),
            };
            if let Unwind::Go { binary } = &self.unwind {
                draw.arg("--go-binary").arg(binary);
            }
            let mut draw = draw.arg(&out).stdin(Stdio::piped()).stdout(Stdio::null()).spawn()?;
            if let Some(mut stdin) = draw.stdin.take() {
                std::io::Write::write_all(&mut stdin, &script.stdout)?;
            }
            if !draw.wait()?.success() {
                return Err(format!("scripts/flamegraph.py failed for {out}").into());
            }
            Ok(())
        })
        .await?
    }
}

/// The profiles of one phase of a benchmark: the proxy's and etcd's, each with its
/// file stem.
#[derive(Default)]
pub struct Profiles(Vec<(Profile, String)>);

impl Profiles {
    /// Starts recording `proxy` (none for the direct target) and `etcd` for `secs`
    /// into `<stem>-proxy` and `<stem>-etcd`.
    pub fn start(stem: &str, proxy: Option<u32>, etcd: u32, secs: u64) -> Result<Profiles, Error> {
        let mut out = Vec::new();
        for (pid, what) in proxy.map(|p| (p, "proxy")).into_iter().chain([(etcd, "etcd")]) {
            out.push((Profile::start(pid, secs, Unwind::of(pid))?, format!("{stem}-{what}")));
        }
        Ok(Profiles(out))
    }

    /// Ends the recordings now.
    pub fn stop(&self) {
        for (p, _) in &self.0 {
            p.stop();
        }
    }

    /// Waits for the recordings and draws them; a line for the report with links to
    /// the flamegraphs (and why one is missing).
    pub async fn finish(self, phase: &str, label: &str) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        let folded_dir = folded_dir("apiload");
        let mut links = Vec::new();
        for (p, stem) in self.0 {
            let file = stem.rsplit('/').next().unwrap_or(&stem).to_string();
            let folded = folded_dir.join(format!("{file}.folded"));
            let title = format!("{label}, {phase}: {}", file.rsplit('-').next().unwrap_or(""));
            match p.finish(&stem, &title, Some(&folded)).await {
                Ok(()) => links.push(format!("[{file}.svg]({file}.svg) ([top functions]({file}.txt))")),
                Err(e) => links.push(format!("{file}: not drawn: {}", crate::chain(&*e))),
            }
        }
        format!("- CPU profiles, {phase}: {}\n", links.join(", "))
    }
}
