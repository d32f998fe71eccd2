//! The `etcdmux` command: serve, check a config file, or migrate an existing
//! installation's keys into the shared layout (`etcdmux migrate ...`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use etcdmux::config::{BackendKind, Config, ListenerConfig, LogFormat};

#[derive(Parser, Debug)]
#[command(name = "etcdmux", version, about = "Multi-tenant etcd v3 gRPC proxy")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (see config/milo.toml); defaults apply without one.
    #[arg(long, env = "ETCDMUX_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address; replaces the first listener's address.
    #[arg(long, env = "ETCDMUX_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where keys are stored: `etcd` (the --upstream cluster) or `sql` (backend.kind).
    #[arg(long, env = "ETCDMUX_BACKEND", value_parser = ["etcd", "sql"])]
    backend: Option<String>,
    /// The SQL database: a libpq string or postgres:// URL (backend.dsn).
    #[arg(long, env = "ETCDMUX_BACKEND_DSN")]
    backend_dsn: Option<String>,
    /// etcd endpoints, comma-separated (http://host:port).
    #[arg(long, env = "ETCDMUX_UPSTREAM", value_delimiter = ',')]
    upstream: Vec<String>,
    /// Every request belongs to this tenant (sidecar mode), on every listener.
    #[arg(long, env = "ETCDMUX_STATIC_TENANT")]
    static_tenant: Option<String>,
    /// HTTP listen address for /metrics, /livez and /readyz.
    #[arg(long, env = "ETCDMUX_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// CA bundle (PEM) for https:// upstream endpoints (upstream.cacert).
    #[arg(long, env = "ETCDMUX_UPSTREAM_CACERT")]
    upstream_cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd (upstream.cert).
    #[arg(long, env = "ETCDMUX_UPSTREAM_CERT")]
    upstream_cert: Option<PathBuf>,
    /// Key (PEM) of --upstream-cert (upstream.key).
    #[arg(long, env = "ETCDMUX_UPSTREAM_KEY")]
    upstream_key: Option<PathBuf>,
    /// Name etcd's certificate is checked against instead of the endpoint host.
    #[arg(long, env = "ETCDMUX_UPSTREAM_SERVER_NAME")]
    upstream_server_name: Option<String>,
    /// TLS certificate (PEM) of every listener (listener.cert_file).
    #[arg(long, env = "ETCDMUX_CERT_FILE")]
    cert_file: Option<PathBuf>,
    /// Key (PEM) of --cert-file (listener.key_file).
    #[arg(long, env = "ETCDMUX_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// CA bundle (PEM) client certificates must chain to (listener.trusted_ca_file).
    #[arg(long, env = "ETCDMUX_TRUSTED_CA_FILE")]
    trusted_ca_file: Option<PathBuf>,
    /// Require a client certificate on every listener (listener.client_cert_auth).
    #[arg(long, env = "ETCDMUX_CLIENT_CERT_AUTH")]
    client_cert_auth: bool,
    /// How often TLS files are checked for rotation, in ms; 0: never
    /// (server.tls_reload_interval_ms).
    #[arg(long, env = "ETCDMUX_TLS_RELOAD_INTERVAL_MS")]
    tls_reload_interval_ms: Option<u64>,
    /// Answer reads from the shared read replica (cache.enabled): true or false.
    #[arg(long, env = "ETCDMUX_CACHE")]
    cache: Option<bool>,
    /// Log lines on stderr as `text` or `json` (log.format).
    #[arg(long, env = "ETCDMUX_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Which events are logged, as RUST_LOG directives (log.level); wins over RUST_LOG.
    #[arg(long, env = "ETCDMUX_LOG_LEVEL")]
    log_level: Option<String>,
    /// OTLP/gRPC collector spans are exported to, http://host:port (tracing.otlp_endpoint).
    #[arg(long, env = "ETCDMUX_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load and validate a config file, print the effective config, and exit.
    CheckConfig { file: PathBuf },
    /// Move an existing installation's keys into the shared layout: plan, copy, verify, cutover, cleanup.
    #[command(subcommand)]
    Migrate(Box<etcdmux::migrate::MigrateCommand>),
    /// The SQL backend's database: `init` creates or migrates its schema.
    #[command(subcommand)]
    Backend(BackendCommand),
}

#[derive(Subcommand, Debug)]
enum BackendCommand {
    /// Create the schema in an empty database, or migrate an older one to this
    /// version's (idempotent; safe to run on every deploy).
    Init {
        /// The database (else backend.dsn of --config).
        #[arg(long = "backend-dsn", env = "ETCDMUX_BACKEND_DSN")]
        dsn: Option<String>,
    },
}

fn load(cli: &Cli) -> Result<Config, String> {
    let mut cfg = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::parse("", "defaults").map_err(|e| e.to_string())?,
    };
    if let Some(addr) = cli.listen {
        match cfg.listeners.first_mut() {
            Some(l) => l.addr = addr,
            None => cfg.listeners.push(ListenerConfig::plain(addr)),
        }
    }
    if !cli.upstream.is_empty() {
        cfg.upstream.endpoints = cli.upstream.clone();
    }
    match cli.backend.as_deref() {
        Some("sql") => cfg.backend.kind = BackendKind::Sql,
        Some(_) => cfg.backend.kind = BackendKind::Etcd,
        None => {}
    }
    if let Some(dsn) = &cli.backend_dsn {
        cfg.backend.dsn.clone_from(dsn);
    }
    if let Some(t) = &cli.static_tenant {
        for l in &mut cfg.listeners {
            l.static_tenant = Some(t.clone());
        }
    }
    if cli.metrics_listen.is_some() {
        cfg.server.metrics_listen = cli.metrics_listen;
    }
    if let Some(ms) = cli.tls_reload_interval_ms {
        cfg.server.tls_reload_interval_ms = ms;
    }
    let u = &mut cfg.upstream;
    for (flag, field) in
        [(&cli.upstream_cacert, &mut u.cacert), (&cli.upstream_cert, &mut u.cert), (&cli.upstream_key, &mut u.key)]
    {
        if flag.is_some() {
            field.clone_from(flag);
        }
    }
    if cli.upstream_server_name.is_some() {
        u.server_name.clone_from(&cli.upstream_server_name);
    }
    for l in &mut cfg.listeners {
        for (flag, field) in [
            (&cli.cert_file, &mut l.cert_file),
            (&cli.key_file, &mut l.key_file),
            (&cli.trusted_ca_file, &mut l.trusted_ca_file),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        l.client_cert_auth |= cli.client_cert_auth;
    }
    if let Some(on) = cli.cache {
        cfg.cache.enabled = on;
    }
    match cli.log_format.as_deref() {
        Some("json") => cfg.log.format = LogFormat::Json,
        Some(_) => cfg.log.format = LogFormat::Text,
        None => {}
    }
    // --log-level, else RUST_LOG, else [log] level.
    match (&cli.log_level, std::env::var("RUST_LOG")) {
        (Some(level), _) => cfg.log.level.clone_from(level),
        (None, Ok(env)) if !env.is_empty() => cfg.log.level = env,
        _ => {}
    }
    if let Some(e) = &cli.otlp_endpoint {
        cfg.tracing.otlp_endpoint.clone_from(e);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// With `--features dhat-heap` every allocation is recorded by call site; the
/// profile is written when `main` returns (after a SIGTERM), to `ETCDMUX_DHAT_OUT`.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::builder()
        .file_name(std::env::var("ETCDMUX_DHAT_OUT").unwrap_or_else(|_| "dhat-heap.json".to_string()))
        .build();
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::load(file).and_then(|c| c.validate().map(|_| c)) {
            Ok(cfg) => {
                // A closed stdout (`check-config f | head`) is not an error of the config.
                let _ = writeln!(std::io::stdout(), "{}: ok\n{cfg:#?}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Backend(BackendCommand::Init { dsn })) = &cli.command {
        return backend_init(&cli, dsn.clone());
    }
    if let Some(Command::Migrate(cmd)) = cli.command {
        return migrate(*cmd);
    }
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("etcdmux: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcdmux: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Within the runtime: the span export task is spawned on it.
    let telemetry = match rt.block_on(async { etcdmux::trace::init(&cfg.log, &cfg.tracing) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("etcdmux: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg, telemetry)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcdmux: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `etcdmux migrate ...`: reports on stdout, progress and errors on stderr; the
/// exit status says what happened (see `MigrateError::exit_code`).
fn migrate(cmd: etcdmux::migrate::MigrateCommand) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcdmux migrate: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tasks = etcdmux::shutdown::Tasks::new();
    let result = rt.block_on(async {
        // SIGINT/SIGTERM: the step stops at its next safe point (the checkpoint
        // holds the position); a second signal exits at once.
        let signals = tasks.clone();
        let done = tokio_util::sync::CancellationToken::new();
        let ended = done.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = ended.cancelled() => return,
            }
            eprintln!("etcdmux migrate: stopping at the next safe point (a second signal exits at once)");
            signals.shut_down();
            tokio::select! {
                _ = shutdown_signal() => std::process::exit(130),
                _ = ended.cancelled() => {}
            }
        });
        let r = etcdmux::migrate::run(cmd, tasks.clone()).await;
        done.cancel();
        tasks.shut_down();
        tasks.wait().await;
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcdmux migrate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `etcdmux backend init`: the schema created or migrated; what was done on stdout.
fn backend_init(cli: &Cli, dsn: Option<String>) -> ExitCode {
    let cfg = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::parse("", "defaults"),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("etcdmux backend init: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(dsn) =
        dsn.or_else(|| cli.backend_dsn.clone()).or_else(|| Some(cfg.backend.dsn.clone()).filter(|d| !d.is_empty()))
    else {
        eprintln!("etcdmux backend init: no database: pass --backend-dsn DSN (or backend.dsn in --config)");
        return ExitCode::FAILURE;
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcdmux backend init: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = std::time::Duration::from_millis(cfg.backend.connect_timeout_ms);
    let tls = match etcdmux::backend::sql::tls::DbTls::from_config(&cfg.backend) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("etcdmux backend init: backend TLS: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(etcdmux::backend::sql::schema::init(&dsn, &tls, timeout)) {
        Ok(report) => {
            let _ = writeln!(std::io::stdout(), "{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("etcdmux backend init: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: Config, telemetry: etcdmux::trace::Telemetry) -> Result<(), etcdmux::grpc::server::BoxError> {
    // Before anything records a metric; the metrics listener itself starts with the
    // server (`health::http`).
    if cfg.server.metrics_listen.is_some() {
        etcdmux::metrics::install().map_err(|e| format!("metrics recorder: {e}"))?;
    }
    let mut running = etcdmux::grpc::server::start(cfg).await?;
    tokio::select! {
        // A listener stopped on its own: a fatal error.
        r = running.wait() => {
            telemetry.shutdown().await;
            return r;
        }
        _ = shutdown_signal() => {}
    }
    tracing::info!("shutting down (a second SIGTERM or SIGINT exits at once)");
    tokio::select! {
        // The last spans are sent after the last calls have ended.
        _ = async { running.shutdown().await; telemetry.shutdown().await } => Ok(()),
        _ = shutdown_signal() => {
            eprintln!("etcdmux: second signal: exiting now");
            std::process::exit(1);
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
