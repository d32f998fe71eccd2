//! `etcdmux migrate`, end to end: the real binary against real etcds, and the
//! migrated data read back through a real etcdmux.
//!
//! - a Milo-shaped installation (1,000 projects × 10 resources, leases) migrated
//!   into another etcd while a writer keeps changing it: verify passes, every
//!   object reads back through etcdmux (each project's cross-root range), leases
//!   kept, old resource versions are too old, a watch sees later writes;
//! - a copy killed with SIGKILL halfway resumes where it was, not from zero;
//! - conflicts in the target, unmatched keys, an unreachable etcd, a missing
//!   migration: refused with a clear message, nothing written;
//! - cleanup: refused before cutover, without `--delete-source`, after a write to
//!   the old layout; interrupted and resumed without losing anything;
//! - one etcd for source and target, with a kplane-shaped source;
//! - the source compacted under the tail: a clear failure, then `--restart`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Client, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use rand::{Rng, SeedableRng};

const RESOURCES: [&str; 10] = MILO_RESOURCES;

/// The output of one `etcdmux migrate` run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "migrate failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_etcdmux"));
    c.arg("migrate").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.env_remove("ETCDMUX_CONFIG");
    c
}

/// Runs `etcdmux migrate <args>` to its end (off the runtime's threads).
async fn migrate(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = command(&refs).output().expect("running etcdmux migrate");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

/// A source and a target etcd, and the config of a migration between them.
struct Pair {
    source: Etcd,
    target: Etcd,
    dir: tempfile::TempDir,
    cfg: String,
}

impl Pair {
    fn start(extra: &str) -> Pair {
        let (source, target) = (Etcd::start(), Etcd::start());
        let dir = tempfile::tempdir().expect("a temp dir");
        let cfg = config(dir.path(), &target.client_url, extra).to_str().expect("a UTF-8 path").to_string();
        Pair { source, target, dir, cfg }
    }
}

/// A Milo config whose upstream (the migration's target) is `target`, plus `extra`.
fn config(dir: &Path, target: &str, extra: &str) -> PathBuf {
    let path = dir.join("etcdmux.toml");
    let text = format!("{MILO_TOML}\n[upstream]\nendpoints = [\"{target}\"]\n{extra}\n");
    std::fs::write(&path, text).expect("writing the config");
    path
}

fn value(p: &str, r: &str, i: usize, gen: u64) -> String {
    format!(
        r#"{{"kind":"{r}","metadata":{{"name":"obj{i}","namespace":"ns","project":"{p}","generation":{gen}}},"spec":"{}"}}"#,
        "x".repeat(150)
    )
}

fn key(p: &str, r: &str, i: usize) -> String {
    if p == "root" {
        format!("/datum-core/{r}/ns/obj{i}")
    } else {
        format!("/projects/{p}/{r}/ns/obj{i}")
    }
}

fn project(n: usize) -> String {
    format!("p{n:04}")
}

/// Puts `projects` × 10 resources × `per` objects (and the root tenant's), events
/// attached to one of `leases` leases; returns the number of keys.
async fn seed(c: &mut Client, projects: usize, per: usize, leases: &[i64]) -> usize {
    let mut ops = Vec::new();
    let mut n = 0;
    let names: Vec<String> = (0..projects).map(project).chain(["root".to_string()]).collect();
    for (pi, p) in names.iter().enumerate() {
        for r in RESOURCES {
            for i in 0..per {
                let opts = (r == "events" && !leases.is_empty())
                    .then(|| PutOptions::new().with_lease(leases[pi % leases.len()]));
                ops.push(TxnOp::put(key(p, r, i), value(p, r, i, 0), opts));
                n += 1;
                if ops.len() == 100 {
                    c.txn(Txn::new().and_then(std::mem::take(&mut ops))).await.expect("seed txn");
                }
            }
        }
    }
    if !ops.is_empty() {
        c.txn(Txn::new().and_then(ops)).await.expect("seed txn");
    }
    n
}

/// Keys and values (and leases) under `prefix`, as `c` sees them.
async fn dump(c: &mut Client, prefix: &str) -> Vec<(String, String, i64)> {
    let resp =
        c.get(prefix, Some(GetOptions::new().with_prefix())).await.unwrap_or_else(|e| panic!("get {prefix}: {e}"));
    resp.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string(), kv.lease()))
        .collect()
}

/// Keeps changing the source until stopped: puts, deletes, new objects, new
/// projects, multi-key txns, leased events. Returns how many writes it made.
fn writer(mut c: Client, projects: usize, lease: i64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let p = project(rng.random_range(0..projects));
            let r = RESOURCES[rng.random_range(0..RESOURCES.len())];
            let i = rng.random_range(0..5);
            let dice = rng.random_range(0..10);
            let res = match dice {
                0..=4 => {
                    let opts = (r == "events").then(|| PutOptions::new().with_lease(lease));
                    c.put(key(&p, r, i), value(&p, r, i, n), opts).await.map(|_| ())
                }
                5..=6 => c.delete(key(&p, r, i), None).await.map(|_| ()),
                7 => {
                    let np = format!("late{}", n % 7);
                    c.put(key(&np, r, i), value(&np, r, i, n), None).await.map(|_| ())
                }
                _ => {
                    let ops = (0..3).map(|j| TxnOp::put(key(&p, RESOURCES[j], 9), value(&p, RESOURCES[j], 9, n), None));
                    c.txn(Txn::new().and_then(ops.collect::<Vec<_>>())).await.map(|_| ())
                }
            };
            res.expect("writer");
            n += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        n
    })
}

/// The number in `text` right before `word` (`"1234 keys copied"`).
fn number_before(text: &str, word: &str) -> Option<u64> {
    let i = text.find(word)?;
    text[..i].split_whitespace().last()?.parse().ok()
}

/// Whether the target holds no migration records at all.
async fn no_checkpoint(c: &mut Client) -> bool {
    c.get("/etcdmux/migrate/", Some(GetOptions::new().with_prefix())).await.unwrap().kvs().is_empty()
}

/// Reads a migration's checkpoint field (`copied_keys = N`) from the target.
async fn checkpoint_field(c: &mut Client, id: &str, field: &str) -> Option<u64> {
    let resp = c.get(format!("/etcdmux/migrate/{id}/checkpoint"), None).await.ok()?;
    let text = resp.kvs().first()?.value_str().ok()?.to_string();
    text.lines().find_map(|l| l.strip_prefix(&format!("{field} = "))?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_milo_installation_migrates_online_under_writes() {
    const PROJECTS: usize = 1000;
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    let mut leases = Vec::new();
    for _ in 0..50 {
        leases.push(src.lease_grant(3600, None).await.unwrap().id());
    }
    let seeded = seed(&mut src, PROJECTS, 3, &leases).await;
    assert_eq!(seeded, (PROJECTS + 1) * 30);
    let old_rev = src.get("none", None).await.unwrap().header().unwrap().revision();

    let plan = migrate(&["plan", "--config", cfg, "--source", src_url]).await.ok();
    assert!(
        plan.stdout.contains(&format!("to copy: {} projects, 10 resources, {seeded} keys", PROJECTS + 1)),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("leases in use: 50 leases"), "{}", plan.stdout);

    // Copy while a writer keeps changing the source.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(client(src_url).await, PROJECTS, leases[0], stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let copy = migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await.ok();
    let copy_secs = started.elapsed().as_secs_f64();
    assert!(copy.stdout.contains("keys copied"), "{}", copy.all());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Verify while the writer still writes: the checkpoint's revisions pin both sides.
    migrate(&["verify", "--config", cfg, "--source", src_url]).await.ok();
    stop.store(true, Ordering::Relaxed);
    let writes = w.await.unwrap();
    assert!(writes > 100, "the writer made {writes} writes");

    let cut = migrate(&["cutover", "--config", cfg, "--source", src_url, "--quiet-ms", "1000"]).await.ok();
    assert!(cut.stdout.contains("verify \"default\": passed"), "{}", cut.all());
    assert!(cut.stdout.contains("target compacted at revision"), "{}", cut.all());
    // Every step is idempotent.
    let again = migrate(&["cutover", "--config", cfg, "--source", src_url, "--quiet-ms", "100"]).await.ok();
    assert!(again.stdout.contains("already cut over"), "{}", again.all());
    migrate(&["verify", "--config", cfg, "--source", src_url]).await.ok();
    eprintln!("copy of {seeded} keys under {writes} writes: {copy_secs:.1} s\n{}", copy.stdout);

    // Every object reads back through etcdmux, per project (a cross-root range).
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![target.client_url.clone()]).await;
    let mut mux = client(&mux_url).await;
    let mut names: Vec<String> = (0..PROJECTS).map(project).collect();
    names.extend((0..7).map(|n| format!("late{n}")));
    let mut objects = 0;
    for p in &names {
        let want = dump(&mut src, &format!("/projects/{p}/")).await;
        let got = dump(&mut mux, &format!("/projects/{p}/")).await;
        assert_eq!(got, want, "project {p}");
        objects += got.len();
    }
    assert_eq!(dump(&mut mux, "/datum-core/").await, dump(&mut src, "/datum-core/").await);
    assert!(objects > seeded - 100, "{objects} objects read back");
    // Leases kept their ids (free in the new etcd) and are alive.
    let leased = dump(&mut mux, "/projects/p0001/events/").await;
    assert!(!leased.is_empty() && leased.iter().all(|(_, _, l)| *l == leases[1]), "{leased:?}");
    let ttl = client(&target.client_url).await.lease_time_to_live(leases[1], None).await.unwrap();
    assert!(ttl.ttl() > 3000, "the lease's remaining TTL was kept: {}", ttl.ttl());

    // A resource version from the source is too old now, never a valid revision.
    let old = mux.get("/projects/p0001/pods/ns/obj0", Some(GetOptions::new().with_revision(old_rev))).await;
    assert!(old.unwrap_err().to_string().contains("compacted"), "a read at an old revision");
    let mut stale = mux
        .watch("/projects/p0001/", Some(WatchOptions::new().with_prefix().with_start_revision(old_rev)))
        .await
        .unwrap();
    let mut compacted = 0;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), stale.message()).await.expect("watch answer") {
        if r.compact_revision() > 0 {
            compacted = r.compact_revision();
            break;
        }
    }
    assert!(compacted > old_rev, "a watch from an old revision is compacted ({compacted})");

    // A watch through etcdmux sees later writes.
    let mut ws = mux.watch("/projects/p0007/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    // etcd-client returns once the stream is open, before the create is served: a
    // write sent now could land before the watch's start revision, here as in etcd.
    let created = tokio::time::timeout(Duration::from_secs(10), ws.message()).await.expect("created within 10 s");
    assert!(created.unwrap().expect("created").created());
    mux.put("/projects/p0007/pods/ns/after-cutover", "v", None).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(r)) = ws.message().await {
            for e in r.events() {
                if e.event_type() == EventType::Put && e.kv().unwrap().key_str().unwrap().ends_with("after-cutover") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .expect("the event within 10 s");
    assert!(seen);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_killed_halfway_resumes_where_it_was() {
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    let total = seed(&mut src, 300, 3, &[]).await as u64;
    let mut tgt = client(&target.client_url).await;

    // A slow copy, killed (SIGKILL) once it has copied some keys.
    let mut child =
        command(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up", "--keys-per-sec", "1500"])
            .spawn()
            .expect("starting the copy");
    let deadline = Instant::now() + Duration::from_secs(30);
    let at_kill = loop {
        if let Some(n) = checkpoint_field(&mut tgt, "default", "copied_keys").await.filter(|n| *n >= 1000) {
            break n;
        }
        assert!(Instant::now() < deadline, "the copy made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert!(at_kill < total, "killed before the end ({at_kill} of {total})");
    // Changes meanwhile are not lost.
    src.put(key("p0000", "pods", 0), "changed while the copy was dead", None).await.unwrap();
    src.delete(key("p0299", "pods", 1), None).await.unwrap();

    let resumed =
        migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up", "--keys-per-sec", "0"]).await.ok();
    assert!(resumed.stderr.contains("resuming migration \"default\" (run 2)"), "{}", resumed.all());
    let before = number_before(&resumed.stderr, "keys copied").expect("the resumed count");
    assert!(before >= at_kill, "resumed at {before}, the checkpoint said {at_kill} at the kill");
    let now = number_before(&resumed.stdout, "keys copied").expect("keys copied by the second run");
    assert_eq!(before + now, total, "the second run copied only what was left: {}", resumed.all());
    assert_eq!(checkpoint_field(&mut tgt, "default", "runs").await, Some(2));
    let v = migrate(&["verify", "--config", cfg, "--source", src_url]).await.ok();
    assert!(v.stdout.contains("verify \"default\": passed"), "{}", v.stdout);
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![target.client_url.clone()]).await;
    let mut mux = client(&mux_url).await;
    assert_eq!(dump(&mut mux, "/projects/p0000/pods/").await, dump(&mut src, "/projects/p0000/pods/").await);
    assert_eq!(dump(&mut mux, "/projects/p0299/").await, dump(&mut src, "/projects/p0299/").await);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_unmatched_keys_and_bad_input_are_refused_clearly() {
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    seed(&mut src, 5, 2, &[]).await;
    let mut tgt = client(&target.client_url).await;

    // Unreachable etcds, a bad id, a missing config: clear messages, fast.
    let t = Instant::now();
    let r = migrate(&["plan", "--config", cfg, "--source", "http://127.0.0.1:1"]).await;
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("source etcd http://127.0.0.1:1: unreachable"), "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(20));
    let bad_target = config(pair.dir.path(), "http://127.0.0.1:1", "");
    let r = migrate(&["copy", "--config", bad_target.to_str().unwrap(), "--source", src_url]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("target etcd http://127.0.0.1:1: unreachable"), "{}", r.stderr);
    let cfg = config(pair.dir.path(), &target.client_url, "");
    let cfg = cfg.to_str().unwrap();
    let r = migrate(&["copy", "--config", cfg, "--source", src_url, "--id", "a/b"]).await;
    assert_eq!(r.code, 2, "{}", r.all());
    let r = migrate(&["copy", "--config", "/nonexistent.toml", "--source", src_url]).await;
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("/nonexistent.toml"), "{}", r.stderr);
    // Verify, cutover, cleanup of a migration that does not exist.
    for step in ["verify", "cutover", "cleanup"] {
        let r = migrate(&[step, "--config", cfg, "--source", src_url]).await;
        assert_eq!(r.code, 4, "{step}: {}", r.all());
        assert!(r.stderr.contains("nothing copied yet"), "{step}: {}", r.stderr);
    }

    // Keys in the migrated ranges that match no rule: refused, nothing written.
    src.put("/projects/p0001", "a key without a project path", None).await.unwrap();
    src.put("/projects/root/pods/x", "a project may not be named root", None).await.unwrap();
    let r = migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await;
    assert_eq!(r.code, 4, "{}", r.all());
    assert!(r.stderr.contains("2 source keys in the migrated ranges match no tenant rule"), "{}", r.stderr);
    assert!(r.stderr.contains("\"/projects/p0001\"") && r.stderr.contains("reserved"), "{}", r.stderr);
    assert!(no_checkpoint(&mut tgt).await, "nothing written");
    let plan = migrate(&["plan", "--config", cfg, "--source", src_url]).await.ok();
    assert!(plan.stdout.contains("keys matching no tenant rule (not copied): 2"), "{}", plan.stdout);

    // A target already holding a project's keys: refused, then resolved as told.
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![target.client_url.clone()]).await;
    let mut mux = client(&mux_url).await;
    mux.put("/projects/p0002/pods/ns/native", "written through etcdmux", None).await.unwrap();
    let r = migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up", "--skip-unmatched"]).await;
    assert_eq!(r.code, 4, "{}", r.all());
    assert!(
        r.stderr.contains("already holds keys of 1 migrated projects") && r.stderr.contains("project p0002: 1 keys"),
        "{}",
        r.stderr
    );
    assert!(no_checkpoint(&mut tgt).await, "nothing written");
    let skip = [
        "copy",
        "--config",
        cfg,
        "--source",
        src_url,
        "--until-caught-up",
        "--skip-unmatched",
        "--on-conflict",
        "skip",
    ];
    migrate(&skip).await.ok();
    migrate(&["verify", "--config", cfg, "--source", src_url]).await.ok();
    assert_eq!(dump(&mut mux, "/projects/p0002/").await.len(), 1, "a skipped project is left as it was");
    assert_eq!(dump(&mut mux, "/projects/p0003/").await, dump(&mut src, "/projects/p0003/").await);
    let list = pair.dir.path().join("projects.txt");
    std::fs::write(&list, "# the second batch\np0002\n").unwrap();
    let overwrite = [
        "copy",
        "--config",
        cfg,
        "--source",
        src_url,
        "--until-caught-up",
        "--skip-unmatched",
        "--on-conflict",
        "overwrite",
        "--id",
        "second",
        "--projects-file",
        list.to_str().unwrap(),
    ];
    let r = migrate(&overwrite).await.ok();
    assert!(r.stderr.contains("overwriting the target's keys of 1 projects"), "{}", r.all());
    migrate(&["verify", "--config", cfg, "--source", src_url, "--id", "default,second"]).await.ok();
    assert_eq!(dump(&mut mux, "/projects/p0002/").await, dump(&mut src, "/projects/p0002/").await);
    // A resumed migration refuses other projects than its own.
    let r = migrate(&["copy", "--config", cfg, "--source", src_url, "--id", "second", "--projects", "p0003"]).await;
    assert_eq!(r.code, 4, "{}", r.all());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cleanup_deletes_only_after_cutover_and_survives_an_interruption() {
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    seed(&mut src, 100, 3, &[]).await;
    migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await.ok();

    let r = migrate(&["cleanup", "--config", cfg, "--source", src_url, "--delete-source"]).await;
    assert_eq!(r.code, 4, "{}", r.all());
    assert!(r.stderr.contains("is not cut over"), "{}", r.stderr);
    // A cutover while the old layout is still written is refused.
    let mut w = client(src_url).await;
    let busy = tokio::spawn(async move {
        for i in 0..500 {
            w.put(key("p0003", "pods", 100 + i), "late", None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let r = migrate(&["cutover", "--config", cfg, "--source", src_url, "--quiet-ms", "2000"]).await;
    busy.abort();
    let _ = busy.await;
    assert_eq!(r.code, 4, "{}", r.all());
    assert!(r.stderr.contains("written after the cutover fence"), "{}", r.stderr);
    // Once the writer is gone, the cutover goes through and its writes were migrated.
    migrate(&["cutover", "--config", cfg, "--source", src_url, "--quiet-ms", "500"]).await.ok();
    let prefixes: Vec<String> =
        (0..100).map(|p| format!("/projects/{}/", project(p))).chain(["/datum-core/".to_string()]).collect();
    let mut expected = Vec::new();
    for p in &prefixes {
        expected.push(dump(&mut src, p).await);
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    assert!(total > 3030, "the late writes are part of the migration ({total} keys)");

    let r = migrate(&["cleanup", "--config", cfg, "--source", src_url]).await;
    assert_eq!(r.code, 4, "{}", r.all());
    assert!(
        r.stdout.contains(&format!("would delete {total} keys")) && r.stderr.contains("--delete-source"),
        "{}",
        r.all()
    );
    // A write to the old layout after cutover: nothing is deleted.
    src.put(key("p0005", "pods", 0), "written to the old layout after cutover", None).await.unwrap();
    let r = migrate(&["cleanup", "--config", cfg, "--source", src_url, "--delete-source"]).await;
    assert_eq!(r.code, 4, "{}", r.all());
    assert!(r.stderr.contains("written in the source after the cutover") && r.stderr.contains("p0005"), "{}", r.stderr);
    assert_eq!(dump(&mut src, "/projects/").await.len() + 30, total, "nothing deleted");
    src.delete(key("p0005", "pods", 0), None).await.unwrap();
    let total = total - 1;

    // Interrupted (SIGKILL) halfway, then run again.
    let args =
        ["cleanup", "--config", cfg, "--source", src_url, "--delete-source", "--batch", "10", "--keys-per-sec", "400"];
    let mut child = command(&args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while dump(&mut src, "/projects/").await.len() + 30 > total - 300 {
        assert!(Instant::now() < deadline, "cleanup made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dump(&mut src, "/projects/").await.is_empty(), "killed before the end");
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![target.client_url.clone()]).await;
    let mut mux = client(&mux_url).await;
    for (p, want) in prefixes.iter().zip(&expected) {
        assert_eq!(&dump(&mut mux, p).await, want, "{p} in the target after the interrupted cleanup");
    }
    let r = migrate(&["cleanup", "--config", cfg, "--source", src_url, "--delete-source"]).await.ok();
    assert!(r.stdout.contains("keys deleted from the source"), "{}", r.all());
    assert!(dump(&mut src, "/projects/").await.is_empty() && dump(&mut src, "/datum-core/").await.is_empty());
    let again = migrate(&["cleanup", "--config", cfg, "--source", src_url, "--delete-source"]).await.ok();
    assert!(again.stdout.contains("already done"), "{}", again.all());
    for (p, want) in prefixes.iter().zip(&expected) {
        assert_eq!(&dump(&mut mux, p).await, want, "{p} in the target after cleanup");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_etcd_with_a_kplane_shaped_source() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = "[migrate]\nsource_rule = [ { prefix = \"/kplane/{resource}/clusters/{tenant}/\" } ]";
    let cfg = config(dir.path(), &etcd.client_url, extra);
    let cfg = cfg.to_str().unwrap();
    let url = etcd.client_url.as_str();
    let mut c = client(url).await;
    let lease = c.lease_grant(600, None).await.unwrap().id();
    for p in ["a", "b", "c"] {
        for r in ["pods", "apps.k8s.io/deployments", "events"] {
            for i in 0..3 {
                let opts = (r == "events").then(|| PutOptions::new().with_lease(lease));
                c.put(format!("/kplane/{r}/clusters/{p}/ns/o{i}"), format!("{p}-{r}-{i}"), opts).await.unwrap();
            }
        }
    }
    migrate(&["copy", "--config", cfg, "--source", url, "--until-caught-up"]).await.ok();
    c.put("/kplane/pods/clusters/a/ns/tail", "written during the tail", None).await.unwrap();
    let cut = migrate(&["cutover", "--config", cfg, "--source", url, "--quiet-ms", "300"]).await.ok();
    assert!(cut.stdout.contains("passed"), "{}", cut.all());
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![url.to_string()]).await;
    let mut mux = client(&mux_url).await;
    let a = dump(&mut mux, "/projects/a/").await;
    assert_eq!(a.len(), 10, "{a:?}");
    assert!(a.contains(&("/projects/a/pods/ns/tail".to_string(), "written during the tail".to_string(), 0)));
    assert!(a.iter().filter(|(k, ..)| k.contains("/events/")).all(|(_, _, l)| *l == lease), "one etcd: the same lease");
    // The copied lease is usable through etcdmux.
    mux.put("/projects/b/events/ns/new", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_compacted_under_the_tail_fails_clearly_then_restarts() {
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    seed(&mut src, 20, 2, &[]).await;
    migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await.ok();
    // Changes the tail has not seen, then the source compacts them away.
    src.delete("/projects/p0004/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    src.put(key("p0001", "pods", 0), "after the gap", None).await.unwrap();
    let rev = src.put("x-other", "y", None).await.unwrap().header().unwrap().revision();
    src.compact(rev, None).await.unwrap();
    let r = migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await;
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("compacted past revision") && r.stderr.contains("--restart"), "{}", r.stderr);
    let r = migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up", "--restart"]).await.ok();
    assert!(r.stderr.contains("wipe: removing the target's keys of tenant p0004"), "{}", r.all());
    migrate(&["verify", "--config", cfg, "--source", src_url]).await.ok();
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![target.client_url.clone()]).await;
    let mut mux = client(&mux_url).await;
    assert!(dump(&mut mux, "/projects/p0004/").await.is_empty(), "the deleted project is gone from the target too");
    assert_eq!(dump(&mut mux, "/projects/p0001/pods/").await, dump(&mut src, "/projects/p0001/pods/").await);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_kept_alive_in_the_source_stays_alive_in_the_target_until_sigterm() {
    let pair = Pair::start("[migrate]\nlease_sync_interval_ms = 1000");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    let lease = src.lease_grant(6, None).await.unwrap().id();
    src.put("/projects/p/events/ns/e", "kept alive", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    // The source's lease is kept alive by its owner the whole time.
    let (mut keeper, mut acks) = src.lease_keep_alive(lease).await.unwrap();
    let keep = tokio::spawn(async move {
        loop {
            keeper.keep_alive().await.unwrap();
            acks.message().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // A copy left tailing (no --until-caught-up), stopped by SIGTERM later.
    let child = command(&["copy", "--config", cfg, "--source", src_url]).spawn().unwrap();
    let mut tgt = client(&target.client_url).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let got = dump(&mut tgt, "/registry/events/clusters/p/").await;
    assert_eq!(got.len(), 1, "the copy outlived its 6 s TTL while the source's lease lived: {got:?}");
    assert_eq!(got[0].2, lease);
    assert!(tgt.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    keep.abort();
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SIGTERM ends a tailing copy with 0: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is in the target"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_reports_every_difference() {
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    let lease = src.lease_grant(600, None).await.unwrap().id();
    seed(&mut src, 10, 2, &[lease]).await;
    migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await.ok();
    let v = migrate(&["verify", "--config", cfg, "--source", src_url, "--all-rows"]).await.ok();
    assert_eq!(v.stdout.matches("  ok ").count(), 11 * 10, "every project and resource: {}", v.stdout);

    // Break the target behind the tool's back, one way per kind of difference.
    let mut tgt = client(&target.client_url).await;
    tgt.put("/registry/pods/clusters/p0001/ns/obj0", "tampered", None).await.unwrap();
    tgt.delete("/registry/configmaps/clusters/p0002/ns/obj1", None).await.unwrap();
    tgt.put("/registry/secrets/clusters/p0003/ns/extra", "not in the source", None).await.unwrap();
    tgt.put("/registry/events/clusters/p0004/ns/obj0", value("p0004", "events", 0, 0), None).await.unwrap();
    // The root index has one key per resource for every project: all eleven (ten and
    // root) lose it, in one line.
    tgt.delete("/etcdmux/slots/uservices", None).await.unwrap();
    let r = migrate(&["verify", "--config", cfg, "--source", src_url]).await;
    assert_eq!(r.code, 3, "{}", r.all());
    for want in [
        "project p0001, pods: \"/pods/ns/obj0\": value differs",
        "project p0002, configmaps: \"/configmaps/ns/obj1\": missing in the target",
        "project p0003, secrets: \"/secrets/ns/extra\": only in the target",
        "project p0004, events: \"/events/ns/obj0\": lease differs",
        "services: no root-index entry in the target (cross-root ranges of 11 project(s) would miss their 22 keys: \
         p0000, p0001, p0002, p0003, p0004, p0005, p0006, p0007, p0008, p0009, root)",
    ] {
        assert!(r.stdout.contains(want), "{want:?} not reported:\n{}", r.stdout);
    }
    assert_eq!(r.stdout.matches(": no root-index entry in the target").count(), 1, "{}", r.stdout);
    assert!(r.stdout.contains("verify \"default\": 5 differences"), "{}", r.stdout);
    // Cutover refuses on the same differences; the source stays the truth.
    let c = migrate(&["cutover", "--config", cfg, "--source", src_url, "--quiet-ms", "100"]).await;
    assert_eq!(c.code, 3, "{}", c.all());
    assert!(c.stderr.contains("the source stays the truth"), "{}", c.stderr);
    let r = migrate(&["cleanup", "--config", cfg, "--source", src_url, "--delete-source"]).await;
    assert_eq!(r.code, 4, "no cleanup without a passing cutover: {}", r.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_expiring_during_cutover_is_not_a_write() {
    let pair = Pair::start("");
    let (source, target, cfg) = (&pair.source, &pair.target, pair.cfg.as_str());
    let src_url = source.client_url.as_str();
    let mut src = client(src_url).await;
    seed(&mut src, 3, 1, &[]).await;
    let lease = src.lease_grant(4, None).await.unwrap().id();
    src.put("/projects/p0000/events/ns/short", "expires soon", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    migrate(&["copy", "--config", cfg, "--source", src_url, "--until-caught-up"]).await.ok();
    // The lease expires within the quiet period: its delete is applied, not refused.
    let cut = migrate(&["cutover", "--config", cfg, "--source", src_url, "--quiet-ms", "6000"]).await.ok();
    assert!(cut.stdout.contains("passed"), "{}", cut.all());
    let left = dump(&mut src, "/projects/p0000/events/ns/short").await;
    assert!(left.is_empty(), "the source's lease expired meanwhile: {left:?}\n{}", cut.all());
    let (running, mux_url) = start_mux_with(MILO_TOML, vec![target.client_url.clone()]).await;
    let mut mux = client(&mux_url).await;
    assert!(dump(&mut mux, "/projects/p0000/events/ns/short").await.is_empty(), "and the copy is gone too");
    assert_eq!(dump(&mut mux, "/projects/p0000/").await, dump(&mut src, "/projects/p0000/").await);
    assert_eq!(dump(&mut mux, "/projects/p0001/").await, dump(&mut src, "/projects/p0001/").await);
    running.shutdown().await;
}
