//! Per-tenant metrics stay bounded: 300 tenants through one etcdmux with
//! `tenant_metrics_top = 10` make at most 11 tenant series per metric, the busy
//! tenants keep their own label, and the series sum to the calls made. Latency is a
//! histogram. One test: metrics are process-wide.

mod common;

use std::time::Duration;

use common::{client, start_mux, Etcd, MILO_TOML};
use etcd_client::WatchOptions;
use etcdmux::metrics::names;

const TOP: usize = 10;
const HEAVY: usize = 5;
const HEAVY_PUTS: usize = 4;
const SINGLES: usize = 300;
const PUT: &str = "/etcdserverpb.KV/Put";

/// The samples of `name` (exactly): (labels text, value).
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The value of label `key` in a labels text.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

fn tenants_of(text: &str, name: &str) -> std::collections::BTreeSet<String> {
    samples(text, name).iter().filter_map(|(l, _)| label(l, "tenant")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_series_are_bounded_and_sum_to_the_calls() {
    let handle = etcdmux::metrics::install().expect("metrics recorder");
    let etcd = Etcd::start();
    let mut mux = start_mux(&etcd, &format!("{MILO_TOML}\n[server]\ntenant_metrics_top = {TOP}\n")).await;
    let mut c = client(&mux.url).await;

    // A few busy tenants first, then 300 that make one call each.
    for h in 0..HEAVY {
        for i in 0..HEAVY_PUTS {
            c.put(format!("/projects/heavy{h}/configmaps/k{i}"), "v", None).await.expect("put");
        }
    }
    for t in 0..SINGLES {
        c.put(format!("/projects/t{t}/configmaps/k"), "v", None).await.expect("put");
    }
    // A watcher of a busy tenant, and one event for it.
    let mut stream =
        c.watch("/projects/heavy0/configmaps/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
    let created = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(created.expect("created within 10 s").expect("watch stream").expect("created").created());
    c.put("/projects/heavy0/configmaps/w", "v", None).await.expect("put");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(resp) = stream.message().await.expect("watch stream") {
            if !resp.events().is_empty() {
                return resp.events().len();
            }
        }
        0
    })
    .await
    .expect("the event within 10 s");
    assert_eq!(got, 1);
    let puts = (HEAVY * HEAVY_PUTS + SINGLES + 1) as f64;

    let text = handle.render();
    let requests: Vec<_> =
        samples(&text, names::TENANT_REQUESTS).into_iter().filter(|(l, _)| label(l, "method") == Some(PUT)).collect();
    let tenants = tenants_of(&text, names::TENANT_REQUESTS);
    assert!(tenants.len() <= TOP + 1, "{} tenant series: {tenants:?}", tenants.len());
    for h in 0..HEAVY {
        assert!(tenants.contains(&format!("heavy{h}")), "busy tenant heavy{h} has its label: {tenants:?}");
    }
    assert!(tenants.contains("other"), "{tenants:?}");
    assert_eq!(requests.iter().map(|(_, v)| v).sum::<f64>(), puts, "every put counted once:\n{text}");
    let all_puts: f64 = samples(&text, names::GRPC_REQUESTS)
        .iter()
        .filter(|(l, _)| label(l, "method") == Some(PUT))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(all_puts, puts, "the per-tenant sum equals the total");
    let heavy0: f64 = requests.iter().filter(|(l, _)| label(l, "tenant") == Some("heavy0")).map(|(_, v)| v).sum();
    // Its first put made it known (counted in "other"); the rest, and the watched
    // put, under its own label.
    assert_eq!(heavy0, HEAVY_PUTS as f64, "heavy0:\n{text}");

    for name in [names::TENANT_ERRORS, names::TENANT_BYTES, names::TENANT_WATCHERS, names::TENANT_EVENTS] {
        let t = tenants_of(&text, name);
        assert!(t.len() <= TOP + 1, "{name}: {t:?}");
    }
    let bytes = samples(&text, names::TENANT_BYTES);
    for dir in ["in", "out"] {
        let sum: f64 = bytes.iter().filter(|(l, _)| label(l, "direction") == Some(dir)).map(|(_, v)| v).sum();
        assert!(sum >= puts, "{dir}: {sum} bytes for {puts} puts");
    }
    let watchers = samples(&text, names::TENANT_WATCHERS);
    assert!(watchers.iter().any(|(l, v)| label(l, "tenant") == Some("heavy0") && *v == 1.0), "{watchers:?}");
    let events = samples(&text, names::TENANT_EVENTS);
    assert!(events.iter().any(|(l, v)| label(l, "tenant") == Some("heavy0") && *v >= 1.0), "{events:?}");

    let buckets = samples(&text, &format!("{}_bucket", names::GRPC_REQUEST_DURATION));
    assert!(
        buckets.iter().any(|(l, v)| label(l, "method") == Some(PUT) && label(l, "le") == Some("+Inf") && *v == puts),
        "latency is a histogram:\n{text}"
    );
    mux.shutdown().await;
}
