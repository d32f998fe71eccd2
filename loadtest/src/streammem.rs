//! streammem: where a client watch stream's memory goes in etcdmux.
//!
//! Opens `--streams` watch streams on `--connections` connections to one etcdmux,
//! `--watches` watches on each (every watch its own (project, resource)), and
//! reports etcdmux's RSS growth per stream and per watch. With an etcdmux built with
//! `--features dhat-heap` (`make mem-profile`), it then stops etcdmux with SIGTERM
//! so the heap profile is written, and breaks the bytes live at the peak down by
//! component (the crate and function that allocated them), per stream.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use etcdmux::pb::etcdserverpb::kv_client::KvClient;
use etcdmux::pb::etcdserverpb::watch_client::WatchClient;
use etcdmux::pb::etcdserverpb::{watch_request, RangeRequest, WatchCreateRequest, WatchRequest};
use etcdmux_loadtest::{
    b, machine, prefix_end, rss_kib, start_etcd, start_front, write_report, write_summary, Error, FrontKind,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(about = "etcdmux memory per client watch stream, by component")]
struct Args {
    /// The etcdmux binary (built with `--features dhat-heap` for the breakdown).
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    /// Client watch streams.
    #[arg(long, default_value_t = 20_000)]
    streams: usize,
    /// Watches per stream.
    #[arg(long, default_value_t = 1)]
    watches: usize,
    /// Connections the streams are spread over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Streams being opened at a time: a stream counts until its first watch is
    /// created. 0: all at once (the worst burst h2 meets); an apiserver's cachers
    /// open theirs as their lists finish, `apiload --setup-concurrency` at a time.
    #[arg(long, default_value_t = 0)]
    open_concurrency: usize,
    /// Also keep the heap profile (dhat's JSON, for `dh_view.html` or a finer
    /// breakdown) at this path.
    #[arg(long)]
    keep_profile: Option<PathBuf>,
    /// Component rows in the breakdown.
    #[arg(long, default_value_t = 25)]
    top: usize,
    /// Report name: loadtest/results/<name>.md
    #[arg(long, default_value = "streammem")]
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let etcd = start_etcd().await?;
    let dir = tempfile::tempdir()?;
    let dhat_out = dir.path().join("dhat-heap.json");
    // SAFETY: set before any thread of ours reads the environment concurrently; the
    // child etcdmux inherits it.
    unsafe { std::env::set_var("ETCDMUX_DHAT_OUT", &dhat_out) };
    let kind = FrontKind::Etcdmux { bin: args.etcdmux.clone(), config: etcdmux_loadtest::MILO_CONFIG.into() };
    let mut front = start_front(&etcd, &kind, dir.path(), "").await?;
    let pid = front.proc.as_ref().map(|p| p.pid()).ok_or("no etcdmux process")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);

    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(Endpoint::from_shared(front.url.clone())?.connect().await?);
    }
    // Watches start at an explicit revision, as the apiserver's do (from a list's
    // resource version): one with start_revision 0 costs etcdmux an upstream call
    // to learn etcd's revision, which would be the peak instead of the streams.
    let mut kv = KvClient::new(channels[0].clone());
    let rev = kv.range(RangeRequest { key: b("/projects/p0/res0/x"), ..Default::default() }).await?.into_inner();
    let start = rev.header.map_or(1, |h| h.revision + 1);
    let (created_tx, mut created_rx) = mpsc::unbounded_channel::<()>();
    let opening = Arc::new(Semaphore::new(match args.open_concurrency {
        0 => Semaphore::MAX_PERMITS,
        n => n,
    }));
    let mut streams = Vec::with_capacity(args.streams);
    for s in 0..args.streams {
        let channel = channels[s % channels.len()].clone();
        let permit = opening.clone().acquire_owned().await?;
        streams.push(open(channel, s, args.watches, start, created_tx.clone(), permit).await?);
    }
    drop(created_tx);
    let want = args.streams * args.watches;
    let mut created = 0;
    while created < want {
        match tokio::time::timeout(Duration::from_secs(60), created_rx.recv()).await {
            Ok(Some(())) => created += 1,
            _ => return Err(format!("only {created} of {want} watches created").into()),
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let grown = after.saturating_sub(before) as f64 * 1024.0;

    let mut report = String::new();
    writeln!(report, "# Memory per client watch stream in etcdmux\n")?;
    writeln!(report, "Machine: {}\n", machine())?;
    writeln!(
        report,
        "Command: `streammem --etcdmux {} --streams {} --watches {} --connections {} --open-concurrency {}`\n",
        args.etcdmux.display(),
        args.streams,
        args.watches,
        args.connections,
        args.open_concurrency
    )?;
    writeln!(report, "| streams | watches | connections | etcdmux RSS before / after MiB | per stream | per watch |")?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    writeln!(
        report,
        "| {} | {want} | {} | {:.1} / {:.1} | {:.0} B | {:.0} B |",
        args.streams,
        args.connections,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        grown / args.streams as f64,
        grown / want as f64
    )?;

    write_summary(
        &args.name,
        &serde_json::json!({
            "machine": machine(),
            "streams": args.streams,
            "watches": want,
            "connections": args.connections,
            "open_concurrency": args.open_concurrency,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "per_stream_bytes": grown / args.streams as f64,
            "per_watch_bytes": grown / want as f64,
        }),
    )?;

    // SIGTERM: etcdmux drains and returns from main, where a dhat build writes its
    // profile. The streams stay open until then, so the peak holds them all.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    if let Some(mut p) = front.proc.take() {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while p.0.try_wait()?.is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(streams);
    if let Some(keep) = &args.keep_profile {
        if let Err(e) = std::fs::copy(&dhat_out, keep) {
            eprintln!("streammem: keeping the heap profile at {}: {e}", keep.display());
        }
    }
    match std::fs::read_to_string(&dhat_out) {
        Ok(json) => breakdown(&json, args.streams, args.top, &mut report)?,
        Err(_) => writeln!(report, "\n(No heap profile: etcdmux was not built with `--features dhat-heap`.)")?,
    }
    let path = write_report(&args.name, &report)?;
    print!("{report}");
    eprintln!("streammem: report written to {}", path.display());
    Ok(())
}

/// A stream (its own call on `channel`) with `watches` watches from `start_revision`; every
/// `created` answer is reported on `created`, and `opening` is released at the first.
async fn open(
    channel: Channel,
    s: usize,
    watches: usize,
    start_revision: i64,
    created: mpsc::UnboundedSender<()>,
    opening: OwnedSemaphorePermit,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let (tx, rx) = mpsc::channel(watches.max(1));
    for w in 0..watches {
        let prefix = format!("/projects/p{s}/res{w}/");
        let (key, range_end) = (b(&prefix), prefix_end(&prefix));
        let c = WatchCreateRequest { key, range_end, start_revision, ..Default::default() };
        tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await?;
    }
    let mut client = WatchClient::new(channel);
    Ok(tokio::spawn(async move {
        let _keep_open = tx;
        let resp = match client.watch(ReceiverStream::new(rx)).await {
            Ok(resp) => resp,
            Err(e) => return eprintln!("streammem: stream {s}: the watch call failed: {e}"),
        };
        let mut stream = resp.into_inner();
        let mut opening = Some(opening);
        loop {
            match stream.message().await {
                Ok(Some(r)) if r.created => {
                    drop(opening.take());
                    if created.send(()).is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => return eprintln!("streammem: stream {s}: {e}"),
            }
        }
    }))
}

/// The bytes live at the heap's peak (dhat's t-gmax), by the first frame that names
/// a component, per stream.
fn breakdown(json: &str, streams: usize, top: usize, report: &mut String) -> Result<(), Error> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let frames: Vec<&str> = v["ftbl"].as_array().ok_or("no ftbl")?.iter().map(|f| f.as_str().unwrap_or("?")).collect();
    let mut by: HashMap<String, (f64, f64)> = HashMap::new();
    let mut total = 0.0;
    for pp in v["pps"].as_array().ok_or("no pps")? {
        let bytes = pp["gb"].as_f64().unwrap_or(0.0);
        let blocks = pp["gbk"].as_f64().unwrap_or(0.0);
        if bytes == 0.0 {
            continue;
        }
        total += bytes;
        let stack: Vec<&str> = pp["fs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| frames.get(i.as_u64()? as usize).copied())
            .collect();
        let e = by.entry(component(&stack)).or_default();
        e.0 += bytes;
        e.1 += blocks;
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let n = streams.max(1) as f64;
    writeln!(
        report,
        "\nHeap live at the peak (dhat t-gmax): {:.1} MiB, {:.0} B per stream.\n",
        total / 1048576.0,
        total / n
    )?;
    writeln!(report, "| allocated in | bytes per stream | blocks per stream | share |")?;
    writeln!(report, "|---|---|---|---|")?;
    for (name, (bytes, blocks)) in rows.iter().take(top) {
        writeln!(
            report,
            "| `{name}` | {:.0} | {:.2} | {:.1}% |",
            bytes / n,
            blocks / n,
            100.0 * bytes / total.max(1.0)
        )?;
    }
    Ok(())
}

/// Names the allocation by its innermost frame outside the allocator and the
/// standard collections: `crate::module::function`, without the file and line.
fn component(stack: &[&str]) -> String {
    const SKIP: &[&str] = &[
        "dhat::",
        "alloc::",
        "core::",
        "std::",
        "<alloc::",
        "<core::",
        "<std::",
        "hashbrown::",
        "<hashbrown::",
        "bytes::",
        "<bytes::",
        "[root]",
        "__rust",
        "<dhat::",
    ];
    for f in stack {
        // dhat frames: "0x1234: path::to::fn (src/file.rs:10:5)"
        let name = f.split_once(": ").map_or(*f, |(_, n)| n);
        let name = name.split(" (").next().unwrap_or(name);
        if SKIP.iter().any(|s| name.starts_with(s)) || name.starts_with("0x") {
            continue;
        }
        return name.to_string();
    }
    stack.first().copied().unwrap_or("?").to_string()
}
