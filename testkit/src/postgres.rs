//! One PostgreSQL server for a test: `initdb` in a temp dir, a free loopback port,
//! its unix socket in the temp dir, trust authentication; killed by PID on drop.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the server runs
//! as `nobody` (through `setpriv`, which execs it: the child's PID is the server's),
//! with the temp dir given to that user.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Where Debian's `postgresql` package puts the server binaries.
const BIN_DIRS: &[&str] = &["/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin"];
const HINT: &str = "run `make deps` (apt-get install postgresql)";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running PostgreSQL owned by a test.
pub struct Postgres {
    /// `host=127.0.0.1 port=PORT user=etcdmux dbname=postgres`
    pub dsn: String,
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
    running: bool,
    /// Extra `-c` settings, kept for restarts.
    settings: Vec<String>,
}

/// The directory of `initdb` and `postgres`.
pub fn postgres_bin() -> Option<PathBuf> {
    BIN_DIRS.iter().map(PathBuf::from).find(|d| d.join("postgres").exists())
}

fn is_root() -> bool {
    // The kit has no libc binding: /proc tells the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// `program` run as `nobody` when we are root, else as ourselves.
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// A fresh server, accepting connections when this returns. Panics (with its
    /// log) if it cannot start, or if PostgreSQL is not installed.
    pub fn start() -> Postgres {
        Postgres::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start() -> Result<Postgres, String> {
        Postgres::try_start_with(&[])
    }

    /// Like [`Postgres::try_start`], with server settings (`name=value`, passed as
    /// `-c`) after the test defaults, so they override them: a benchmark turns
    /// `fsync` back on to compare with an etcd that syncs its writes.
    pub fn try_start_with(settings: &[&str]) -> Result<Postgres, String> {
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        let bin = postgres_bin().ok_or_else(|| format!("PostgreSQL not found in {BIN_DIRS:?}: {HINT}"))?;
        let mut dir = tempfile::Builder::new().prefix("etcdmux-pg").tempdir().map_err(|e| format!("temp dir: {e}"))?;
        if is_root() {
            // nobody:nogroup
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).map_err(|e| format!("chown: {e}"))?;
        }
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "etcdmux", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let child = spawn(&bin, dir.path(), port, &settings)?;
            let mut pg = Postgres {
                dsn: format!("host=127.0.0.1 port={port} user=etcdmux dbname=postgres"),
                port,
                bin: bin.clone(),
                dir,
                child,
                running: true,
                settings: settings.clone(),
            };
            match pg.wait_ready() {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    last = format!("{e}\n--- log ---\n{}", pg.log());
                    pg.kill();
                    dir = std::mem::replace(&mut pg.dir, tempfile::tempdir().map_err(|e| e.to_string())?);
                }
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
    }

    /// The server's (postmaster's) process ID; its backends are its children.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("postgres exited: {status}"));
            }
            // Accepting TCP and answering pg_isready means it takes queries.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let ok = Command::new(self.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "etcdmux", "-q"])
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("not ready in time".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL) and waits for it; data and port are kept.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.running = false;
    }

    /// Starts the server again on the same port and data (after [`Postgres::kill`];
    /// kills it first if running) and waits until it accepts connections.
    pub fn restart(&mut self) {
        if self.running {
            self.kill();
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.child = spawn(&self.bin, self.dir.path(), self.port, &self.settings).unwrap_or_else(|e| panic!("{e}"));
            self.running = true;
            match self.wait_ready() {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("PostgreSQL did not restart: {e}\n{}", self.log()),
            }
        }
    }

    /// Restarts the server accepting TCP connections over TLS only (plain ones are
    /// refused by `pg_hba.conf`), with `cert` and `key` (PEM files) as its identity.
    pub fn require_tls(&mut self, cert: &Path, key: &Path) {
        let data = self.dir.path().join("data");
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let dest = data.join(to);
            std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
            if is_root() {
                std::os::unix::fs::chown(&dest, Some(65534), Some(65534)).expect("chown");
            }
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        }
        let conf = "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n";
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
        text.push_str(conf);
        std::fs::write(data.join("postgresql.conf"), text).expect("postgresql.conf");
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
        std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");
        self.restart();
    }

    /// After [`Postgres::require_tls`]: role `user` (a superuser) may connect over
    /// TCP only with a client certificate issued by `ca` whose CN is `user`.
    pub fn require_client_cert(&mut self, ca: &Path, user: &str) {
        self.psql(&format!("CREATE ROLE {user} LOGIN SUPERUSER"));
        let data = self.dir.path().join("data");
        std::fs::copy(ca, data.join("client-ca.crt")).expect("copying the client CA");
        if is_root() {
            std::os::unix::fs::chown(data.join("client-ca.crt"), Some(65534), Some(65534)).expect("chown");
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
        conf.push_str("ssl_ca_file = 'client-ca.crt'\n");
        std::fs::write(data.join("postgresql.conf"), conf).expect("postgresql.conf");
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");
        let hba = format!("hostssl all {user} 127.0.0.1/32 cert\n{hba}");
        std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");
        self.restart();
    }

    /// Ends every client connection but the caller's (`pg_terminate_backend`), as a
    /// network cut or a failover would: the server keeps running.
    pub fn drop_connections(&self) {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "etcdmux", "-d", "postgres", "-Atc"])
            .arg("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running psql: {e} ({HINT})"));
        assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Runs one SQL statement with psql; its output (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "etcdmux", "-d", "postgres", "-Atc", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running psql: {e} ({HINT})"));
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The server on `port` with its data and socket in `dir`, logging to `dir/postgres.log`;
/// `settings` (`name=value`) after the defaults.
fn spawn(bin: &Path, dir: &Path, port: u16, settings: &[String]) -> Result<Child, String> {
    let log = File::create(dir.join("postgres.log")).map_err(|e| format!("log file: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    command(&bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(dir)
        // A test database: not durable against a machine crash (no fsync), but every
        // commit survives the process being killed (synchronous_commit stays on: with
        // it off, a kill loses the last commits and revisions are handed out again).
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .args(["-c", "shared_buffers=32MB", "-c", "max_connections=200"])
        // The last of a setting given twice wins.
        .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("starting postgres: {e} ({HINT})"))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() && self.running {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- postgres log (tail) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        self.kill();
    }
}
