//! One point's load: connect, seed, list and watch every (project, resource) as the
//! apiserver's cacher does, then the writers, leases, progress requests and the
//! compactor, every event checked; the row of figures it measured.

// The crate root's types and imports (Args, Model, Row, the clients, ...).
use super::*;

/// The load itself, against `front` (which is etcd itself for the direct target).
pub(super) async fn load(
    args: &Args,
    etcd: &Etcd,
    front: &Front,
    model: Model,
    projects: usize,
    label: &str,
    profile: Option<&str>,
) -> Result<Row, Error> {
    let mut row = Row::default();
    let t_setup = Instant::now();
    let conns = model.connections(projects, args.pool_size);
    let pb = bar(conns, format!("{label} connect"));
    let url = front.url.clone();
    let channels = bounded(conns, args.setup_concurrency, &pb, |i| {
        let url = url.clone();
        // A loopback source address per 20,000 connections: one address's ephemeral
        // ports run out at about 28,000.
        let source = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / 20_000) as u8)));
        async move { connect(&url, source).await }
    })
    .await?;
    pb.finish_and_clear();
    let channels = Arc::new(channels);
    let (resources, objects) = (args.resources, args.objects);
    let chan = |p: usize, r: usize| channels[model.connection_of(p, r, resources, channels.len())].clone();

    // Seed: one txn of puts per project.
    let pb = bar(projects, format!("{label} seed"));
    bounded(projects, args.setup_concurrency, &pb, |p| {
        let ch = chan(p, 0);
        async move {
            let ops = (0..resources)
                .flat_map(|r| (0..objects).map(move |o| (r, o)))
                .map(|(r, o)| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b(&key(p, r, o)),
                        value: b("seed"),
                        ..Default::default()
                    })),
                })
                .collect();
            KvClient::new(ch).txn(TxnRequest { success: ops, ..Default::default() }).await?;
            Ok(())
        }
    })
    .await?;
    pb.finish_and_clear();

    // Lists, then watches from each list's revision + 1: on a stream of their own,
    // or (the Go client) on their connection's one stream.
    let shared = Arc::new(watches::Shared::new());
    let groups: Arc<Vec<watches::SharedStream>> = Arc::new(match model {
        Model::GoClient => channels.iter().map(|ch| watches::SharedStream::open(ch.clone(), shared.clone())).collect(),
        _ => Vec::new(),
    });
    let watches = projects * resources;
    let pb = bar(watches, format!("{label} list+watch"));
    let front_pid = front.proc.as_ref().map(|p| p.pid());
    let setup_profiles = match profile {
        Some(stem) => Profiles::start(&format!("{stem}-setup"), front_pid, etcd.pid(), args.duration_secs)?,
        None => Profiles::default(),
    };
    // Lists running now, and (max, sum) of what each list saw as it started.
    let listing = Arc::new(AtomicUsize::new(0));
    let seen_listing = Arc::new(Mutex::new((0usize, 0usize)));
    let setups = bounded(watches, args.setup_concurrency, &pb, |i| {
        let (p, r, ch, shared, groups) =
            (i / resources, i % resources, chan(i / resources, i % resources), shared.clone(), groups.clone());
        let conn = model.connection_of(p, r, resources, channels.len());
        let (listing, seen_listing) = (listing.clone(), seen_listing.clone());
        async move {
            let now = listing.fetch_add(1, Ordering::Relaxed) + 1;
            {
                let mut s = seen_listing.lock().unwrap_or_else(|e| e.into_inner());
                *s = (s.0.max(now), s.1 + now);
            }
            let listed = watches::list(ch.clone(), p, r).await;
            listing.fetch_sub(1, Ordering::Relaxed);
            let (rev, took, seen) = listed?;
            let own = match groups.get(conn) {
                Some(group) => {
                    group.create(p, r, rev + 1).await?;
                    None
                }
                None => Some(watches::own_stream(ch, p, r, rev + 1, shared).await?),
            };
            Ok((own, took, seen))
        }
    })
    .await?;
    pb.finish_and_clear();
    setup_profiles.stop();
    {
        let s = seen_listing.lock().unwrap_or_else(|e| e.into_inner());
        row.lists_in_flight = (s.0, s.1 as f64 / watches.max(1) as f64);
    }
    let mut known: HashMap<Bytes, i64> = HashMap::new();
    let mut streams = Vec::with_capacity(watches);
    for (own, took, seen) in setups {
        row.list.push(took);
        known.extend(seen);
        streams.extend(own);
    }
    (row.conns, row.streams) = (channels.len(), streams.len() + groups.len());
    row.setup = t_setup.elapsed();

    // The write load.
    let t0 = shared.t0;
    let known = Arc::new(Mutex::new(known));
    let expected: Arc<Mutex<HashMap<(usize, usize), u64>>> = Arc::default();
    // Latencies, successes, conflicts, errors, (start offset, latency) per write.
    type Results = (Vec<Duration>, u64, u64, u64, Vec<(Duration, Duration)>);
    let results: Arc<Mutex<Results>> = Arc::default();
    let inflight = Arc::new(Semaphore::new(64));
    let store = front.store(etcd);
    let profiles = match profile {
        Some(stem) => Profiles::start(stem, front_pid, etcd.pid(), args.duration_secs)?,
        None => Profiles::default(),
    };
    let front_pid = front_pid.unwrap_or(etcd.pid());
    let (front_cpu0, self_cpu0, store_cpu0) = (cpu_time(front_pid), cpu_time(std::process::id()), store.cpu());
    let watch = observe::Watch::start(&etcd.metrics_url, front.metrics_url.as_deref(), store, front_pid).await;
    let load_start = watch.start;
    let total = args.write_rate * args.duration_secs;
    let pb = bar(total as usize, format!("{label} writes"));
    let mut lease_id = 0i64;
    let mut next_lease = Instant::now();
    let mut compacted = false;
    let mut compact_at = Duration::ZERO;
    // Lease grants and the compactor: their failures count as errors too.
    let mut other_errors = 0;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.write_rate.max(1)));
    for i in 0..total {
        tick.tick().await;
        pb.inc(1);
        if next_lease <= Instant::now() {
            match LeaseClient::new(chan(0, 0)).lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await {
                Ok(l) => lease_id = l.into_inner().id,
                Err(_) => other_errors += 1,
            }
            next_lease = Instant::now() + Duration::from_secs(5);
        }
        if !compacted && i >= total / 2 {
            compacted = true;
            compact_at = load_start.elapsed();
            if compact(&chan(0, 0)).await.is_err() {
                other_errors += 1;
            }
        }
        if i % 200 == 0 {
            // The apiserver's consistent reads ask for progress on its streams.
            let all: Vec<&watches::Stream> = streams.iter().chain(groups.iter().map(|g| &g.stream)).collect();
            for w in all.iter().step_by((all.len() / 10).max(1)) {
                w.progress();
            }
        }
        let p = (i as usize * 7919) % projects;
        let r = (i as usize / projects) % resources;
        let o = (i as usize) % (objects + 3);
        let k = b(&key(p, r, o));
        let permit = inflight.clone().acquire_owned().await?;
        let (known, expected, results, ch) = (known.clone(), expected.clone(), results.clone(), chan(p, r));
        let lease = if r == 0 { lease_id } else { 0 };
        tokio::spawn(async move {
            let rev = known.lock().unwrap_or_else(|e| e.into_inner()).get(&k).copied().unwrap_or(0);
            let value = b(&format!("t={}", t0.elapsed().as_nanos()));
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: k.clone(),
                    target_union: Some(compare::TargetUnion::ModRevision(rev)),
                    ..Default::default()
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: k.clone(),
                        value,
                        lease,
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: k.clone(),
                        ..Default::default()
                    })),
                }],
            };
            let started = Instant::now();
            let out = KvClient::new(ch).txn(txn).await;
            let took = started.elapsed();
            let mut res = results.lock().unwrap_or_else(|e| e.into_inner());
            match out {
                Ok(t) => {
                    let t = t.into_inner();
                    res.0.push(took);
                    res.4.push((started - load_start, took));
                    if t.succeeded {
                        res.1 += 1;
                        *expected.lock().unwrap_or_else(|e| e.into_inner()).entry((p, r)).or_default() += 1;
                        known.lock().unwrap_or_else(|e| e.into_inner()).insert(k, t.header.map_or(0, |h| h.revision));
                    } else {
                        res.2 += 1;
                        let current = t.responses.first().and_then(|r| match &r.response {
                            Some(response_op::Response::ResponseRange(rr)) => rr.kvs.first().map(|kv| kv.mod_revision),
                            _ => None,
                        });
                        known.lock().unwrap_or_else(|e| e.into_inner()).insert(k, current.unwrap_or(0));
                    }
                }
                Err(_) => res.3 += 1,
            }
            drop(permit);
        });
    }
    let _ = inflight.acquire_many(64).await?;
    pb.finish_and_clear();
    let load_time = load_start.elapsed();
    row.write_throughput = total as f64 / load_time.as_secs_f64();
    row.front_cpu = cpu_time(front_pid).saturating_sub(front_cpu0).as_secs_f64() / load_time.as_secs_f64() * 100.0;
    row.loadgen_cpu =
        cpu_time(std::process::id()).saturating_sub(self_cpu0).as_secs_f64() / load_time.as_secs_f64() * 100.0;
    row.store_cpu = store.cpu().saturating_sub(store_cpu0).as_secs_f64() / load_time.as_secs_f64() * 100.0;

    // Every event delivered, exactly once.
    let expected = expected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    row.expected = expected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got: u64 =
            shared.delivery.lock().unwrap_or_else(|e| e.into_inner()).revisions.values().map(|v| v.len() as u64).sum();
        if got >= row.expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let d = shared.delivery.lock().unwrap_or_else(|e| e.into_inner());
        for revs in d.revisions.values() {
            let mut sorted = revs.clone();
            sorted.sort();
            sorted.dedup();
            row.duplicates += (revs.len() - sorted.len()) as u64;
            row.delivered += sorted.len() as u64;
        }
        row.delivery = d.latencies.clone();
        // When the slowest deliveries' writes were sent, into the write load.
        let offset = load_start.saturating_duration_since(t0);
        let mut slow = d.timed.clone();
        slow.sort_by_key(|(_, took)| std::cmp::Reverse(*took));
        let slow: Vec<String> = slow
            .iter()
            .take(5)
            .map(|(sent, took)| format!("{} ms at {:.2} s", ms(*took), sent.saturating_sub(offset).as_secs_f64()))
            .collect();
        row.details += &format!("- slowest deliveries (when their write was sent): {}\n", slow.join(", "));
    }
    row.progress_replies = shared.progress.load(Ordering::Relaxed);
    {
        let res = results.lock().unwrap_or_else(|e| e.into_inner());
        row.write = res.0.clone();
        // When the slowest writes happened: a stall shows as several at one moment.
        let mut slow = res.4.clone();
        slow.sort_by_key(|(_, took)| std::cmp::Reverse(*took));
        let slow: Vec<String> =
            slow.iter().take(5).map(|(at, took)| format!("{} ms at {:.2} s", ms(*took), at.as_secs_f64())).collect();
        row.slowest = format!("{} (compactor at {:.2} s)", slow.join(", "), compact_at.as_secs_f64());
        (row.writes_ok, row.conflicts, row.errors) = (res.1, res.2, res.3 + other_errors);
    }
    // etcd's compaction runs on after the load: its figures count once it ended (the
    // SQL target compacts its database, not etcd: nothing to wait for).
    let wait = Duration::from_secs(if front.pg.is_some() { 0 } else { 60 });
    let client_slow = row.write.iter().filter(|&&w| w > observe::SLOW_WRITE).count();
    let observe::Finished { report: observed, samples, slow_writes } =
        watch.finish(wait, compact_at, client_slow).await;
    row.slow_writes = slow_writes;
    row.details = format!(
        "- lists: p99 {} ms over {} lists; lists in flight as each started: max {}, mean {:.1} (--setup-concurrency {}: each slot lists, then creates its watch)\n{observed}{}",
        ms(percentile(&sorted(&row.list), 0.99)),
        row.list.len(),
        row.lists_in_flight.0,
        row.lists_in_flight.1,
        args.setup_concurrency,
        row.details,
    );
    let writes = results.lock().unwrap_or_else(|e| e.into_inner()).4.clone();
    for (what, p) in [("setup", setup_profiles), ("write load", profiles)] {
        row.details += &p.finish(what, label).await;
    }
    row.details += &format!(
        "\nBy second of the write load (writes by start time; CPU from /proc, sampled every 250 ms):\n\n{}",
        observe::by_second(&writes, &samples, args.duration_secs + 1)
    );
    row.etcd_watchers = metric(&etcd.metrics_url, "etcd_debugging_mvcc_watcher_total").await;
    row.etcd_streams = metric(&etcd.metrics_url, "etcd_debugging_mvcc_watch_stream_total").await;
    row.etcd_conns = established_conns(etcd.client_port());
    Ok(row)
}

fn sorted(v: &[Duration]) -> Vec<Duration> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// The apiserver compactor: bump `compact_rev_key` in a txn, then compact.
async fn compact(ch: &Channel) -> Result<(), tonic::Status> {
    let mut kv = KvClient::new(ch.clone());
    let cur = kv.range(RangeRequest { key: b("compact_rev_key"), ..Default::default() }).await?.into_inner();
    let version = cur.kvs.first().map_or(0, |kv| kv.version);
    let rev = cur.header.map_or(0, |h| h.revision);
    let txn = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: b("compact_rev_key"),
            target_union: Some(compare::TargetUnion::Version(version)),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b("compact_rev_key"),
                value: b(&rev.to_string()),
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b("compact_rev_key"),
                ..Default::default()
            })),
        }],
    };
    // Another compactor winning the txn is not an error: it compacts instead.
    if kv.txn(txn).await?.into_inner().succeeded && rev > 1 {
        kv.compact(CompactionRequest { revision: rev - 1, physical: false }).await?;
    }
    Ok(())
}
