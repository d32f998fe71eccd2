//! The module tree keeps its shape: dependencies between top-level modules of
//! `src/` point one way (no import cycles), and `keyspace` stays pure (no tokio, no
//! tonic), as `src/lib.rs` documents. Read from the `crate::` paths in the source.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(name) => Some(name.to_string()),
        None => Some(first),
    }
}

/// Code without comments: a path named in a doc comment is not a dependency.
fn code_only(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// `crate::NAME` paths in `code` (also inside `use crate::{a, b}` groups).
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = group.split('}').next().unwrap_or("");
            for part in body.split(',') {
                let name: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
            continue;
        }
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(m) = module_of(&src, &f) else { continue };
        let code = code_only(&std::fs::read_to_string(&f).expect("reading source"));
        let deps = g.entry(m.clone()).or_default();
        deps.extend(crate_refs(&code).into_iter().filter(|d| *d != m));
    }
    g
}

/// A cycle through `node`, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let g = graph();
    for m in ["keyspace", "ops", "upstream", "grpc", "watch", "config", "error", "migrate"] {
        assert!(g.contains_key(m), "module {m} not found: {:?}", g.keys());
    }
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle between top-level modules: {}\nfull graph: {g:#?}", cycle.join(" -> "));
    }
}

#[test]
fn the_documented_direction_holds() {
    let g = graph();
    let deps = |m: &str| g.get(m).cloned().unwrap_or_default();
    assert!(deps("keyspace").is_empty(), "keyspace depends on nothing, not {:?}", deps("keyspace"));
    for low in ["ops", "upstream", "keyspace", "config"] {
        for high in ["grpc", "watch"] {
            assert!(!deps(low).contains(high), "{low} must not depend on {high}");
        }
    }
    assert!(!deps("watch").contains("grpc"), "watch must not depend on grpc");
    // The migration tool sits beside the proxy: it uses the proxy's key space, write
    // placement and upstream pool, and nothing of the proxy uses it.
    for (m, d) in &g {
        assert!(m == "migrate" || !d.contains("migrate"), "{m} must not depend on migrate");
    }
    for serving in ["grpc", "watch", "health"] {
        assert!(!deps("migrate").contains(serving), "migrate must not depend on {serving}");
    }
    // Storage sits below everything that serves: the services reach it only
    // through the Backend interface.
    for high in ["ops", "replica", "watch", "health", "grpc", "migrate"] {
        assert!(!deps("backend").contains(high), "backend must not depend on {high}");
    }
}

/// The etcd pool is called only by the etcd backend, by `etcdmux migrate` (etcd to
/// etcd) and by the etcd-only administration calls in `grpc` (defragment, hashes,
/// snapshot, membership): everything else goes through `crate::backend::Backend`,
/// so a second backend serves it all.
#[test]
fn only_the_etcd_backend_calls_etcd() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let allowed = ["backend/etcd.rs", "upstream/", "migrate/", "grpc/maintenance.rs", "grpc/mod.rs"];
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src").to_string_lossy().replace('\\', "/");
        if allowed.iter().any(|a| rel.starts_with(a)) {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&f).expect("reading source"));
        for call in
            ["kv_call(", "lease_call(", "maintenance_call(", "cluster_call(", "stream_channel(", "Upstream::new("]
        {
            assert!(!code.contains(call), "{rel} calls etcd directly ({call}): go through the Backend");
        }
    }
}

#[test]
fn keyspace_is_pure() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/keyspace");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    for f in files {
        let code = code_only(&std::fs::read_to_string(&f).expect("reading source"));
        for banned in ["tokio", "tonic", "async "] {
            assert!(!code.contains(banned), "{} uses {banned}: keyspace has no I/O", f.display());
        }
    }
}

#[test]
fn the_checker_sees_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert!(find_cycle(&g).is_none());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let refs = crate_refs("use crate::{ops::Proxy, keyspace::Scope};\nlet x = crate::upstream::Retry::Safe;");
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["keyspace", "ops", "upstream"]);
}
