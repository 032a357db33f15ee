//! The `otpd` command: the daemon (`serve`) and client tools that speak its socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use otpd::client::{self, Client};
use otpd::config::{Config, Overrides, SystemdDirs};
use otpd::server::Listener;
use otpd::systemd::{self, Activation};

#[derive(Parser)]
#[command(
    version,
    about = "One-time-password daemon: create, deliver and verify short codes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "OTPD_CONFIG")]
        config: Option<PathBuf>,
        /// Socket path (beats the file).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Directory for the database (DIR/db), the secret (DIR/secret.key) and, unless
        /// --socket names another, the socket (DIR/otpd.sock); beats the file.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Create and deliver a code for TOKEN.
    #[command(group(clap::ArgGroup::new("to").required(true).multiple(true)))]
    Create {
        #[command(flatten)]
        token: TokenArg,
        /// Phone number to send the code to by SMS (E.164, e.g. +393331234567).
        #[arg(long, group = "to")]
        sms: Option<String>,
        /// Messenger page-scoped id to send the code to (digits); with --sms too,
        /// Messenger goes first and SMS is the failover.
        #[arg(long, group = "to")]
        messenger: Option<String>,
        /// Validity in seconds (at most the configured ttl_secs).
        // Named as the request's field, which the daemon's refusals name.
        #[arg(long = "ttl-secs", visible_alias = "ttl", value_name = "SECS")]
        ttl: Option<u64>,
        /// Digits in the code (at least the configured code_length, at most 10).
        #[arg(long)]
        code_length: Option<u32>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Verify CODE for TOKEN; exits 0 only when it is valid.
    Verify {
        #[command(flatten)]
        token: TokenArg,
        /// The code the person typed (digits).
        code: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Cancel TOKEN's pending code.
    Cancel {
        #[command(flatten)]
        token: TokenArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show TOKEN's code state (never the code).
    Status {
        #[command(flatten)]
        token: TokenArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show the daemon's counters.
    Stats {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Check that the daemon answers.
    Ping {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Measure a running daemon: throughput, latency percentiles and its memory.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Concurrent connections, each running the op in a loop.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// How long to run (`10s`, `500ms`, `2m`).
    #[arg(long, default_value = "10s", value_parser = otpd::bench::parse_duration)]
    duration: std::time::Duration,
    /// What each client does in a loop.
    #[arg(long, value_enum, default_value = "mixed")]
    op: otpd::bench::Op,
    /// Requests each client sends before reading their answers.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// The daemon's `[delivery] log_file` (log backend), where codes are learnt;
    /// required for --op verify and mixed.
    #[arg(long)]
    codes_file: Option<PathBuf>,
    /// Daemon pid for RSS figures [default: the process holding the socket].
    #[arg(long)]
    pid: Option<u32>,
    /// `ttl_secs` for each created code [default: the daemon's].
    #[arg(long)]
    ttl: Option<u64>,
    /// Stop after this many requests in all.
    #[arg(long)]
    total: Option<u64>,
    /// Codes created before a `--op verify` run.
    #[arg(long, default_value_t = 50_000)]
    preload: usize,
    /// Connections opened and left silent during the run.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// Connections that send one byte a second and never end a line.
    #[arg(long, default_value_t = 0)]
    slow_writers: usize,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(clap::Args)]
struct TokenArg {
    /// The application's request token: 1 to 128 of A-Z a-z 0-9 . _ : @ -
    token: String,
}

#[derive(clap::Args)]
struct SocketArg {
    /// Daemon socket [default: /run/otpd/otpd.sock if present, else ./otpd-data/otpd.sock]
    #[arg(long, env = "OTPD_SOCKET")]
    socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(client::default_socket)
    }
}

/// How long the client tools wait for an answer other than a create's.
const CLIENT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// sled allocates and frees on every write from every thread; under load glibc's malloc
/// spent a quarter of the daemon's CPU there, much of it waiting on arena locks
/// (BENCHMARKS.md, "What got otpd from 5.4 k to 28 k ops/s").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // systemd's socket is taken before the runtime starts any thread.
    let activation = match &cli.command {
        Command::Serve { .. } => systemd::take_activation(),
        _ => Ok(None),
    };
    let activation = match activation {
        Ok(activation) => activation,
        Err(e) => {
            eprintln!("otpd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve {
            config,
            socket,
            data_dir,
        } => serve_config(config, &Overrides { socket, data_dir }).and_then(|config| {
            runtime(config.server.worker_threads)?
                .block_on(serve(config, activation))
                .map(|()| ExitCode::SUCCESS)
        }),
        Command::Bench(args) => bench_runtime().and_then(|runtime| {
            runtime
                .block_on(otpd::bench::run(bench_options(args)))
                .map(|()| ExitCode::SUCCESS)
        }),
        command => runtime(0).and_then(|runtime| runtime.block_on(run_client(command))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("otpd: {e:#}");
        ExitCode::from(2)
    })
}

/// What is logged without `OTPD_LOG`: otpd's own lines from `info` up, the storage
/// engines' from `warn` (fjall logs a line per table it opens at every start, and its
/// write stalls at `info`).
const DEFAULT_LOG_FILTER: &str = "info,fjall=warn,lsm_tree=warn,sled=warn";

/// Logs go to stderr; into the journal without colours or a second timestamp, and
/// with each line's priority.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OTPD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if systemd::stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_ansi(false);
        builder
            .with_ansi(false)
            .event_format(systemd::JournalFormat(format))
            .init();
    } else {
        use std::io::IsTerminal;
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// A multi-thread runtime with `worker_threads` workers (0: one per core).
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    build(builder)
}

/// The load client runs on one thread, as redis-benchmark does: it shares the machine
/// with the daemon it measures, and one thread spends less of it (no wake-ups across
/// threads) than a worker per core (BENCHMARKS.md, "The load client").
fn bench_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    build(tokio::runtime::Builder::new_current_thread())
}

fn build(mut builder: tokio::runtime::Builder) -> anyhow::Result<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// The daemon's configuration: the file (or the defaults), then flags and environment.
fn serve_config(config_file: Option<PathBuf>, overrides: &Overrides) -> anyhow::Result<Config> {
    let mut config = match &config_file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    for replaced in config.resolve_paths(overrides, &SystemdDirs::from_env()) {
        tracing::warn!("{replaced}");
    }
    otpd::delivery::check(&config)?;
    Ok(config)
}

async fn serve(config: Config, activation: Option<Activation>) -> anyhow::Result<()> {
    let listener = match activation {
        Some(Activation { listener }) => {
            let listener = Listener::inherited(listener)?;
            tracing::info!(socket = %listener.name(), "using the socket systemd passed");
            listener
        }
        None => Listener::bind(&config.server.socket, config.server.socket_mode_bits()?)?,
    };
    // What otpd creates from here on (database, secret, log_file) is its own user's
    // alone, whatever the caller's umask: it holds tokens, phone numbers and digests.
    // (otpd.service sets UMask=0077 too; the socket has its own mode.)
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    otpd::daemon::run(config, listener, shutdown_signal()?).await
}

/// Resolves on the first SIGTERM or SIGINT. SIGHUP, SIGUSR1 and SIGUSR2 are logged
/// and otherwise ignored: by default each would end the process on the spot, with
/// nothing logged, no request finished and no flush, and systemd counts a death by
/// SIGHUP as a clean exit, which `Restart=on-failure` does not restart. (logrotate's
/// `postrotate` and many habits send SIGHUP; otpd has no reload.)
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |kind: SignalKind, name: &str| signal(kind).context(format!("{name} handler"));
    let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
    let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = handler(SignalKind::hangup(), "SIGHUP")?;
    let mut usr1 = handler(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut usr2 = handler(SignalKind::user_defined2(), "SIGUSR2")?;
    Ok(async move {
        loop {
            let ignored = tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => "SIGHUP",
                _ = usr1.recv() => "SIGUSR1",
                _ = usr2.recv() => "SIGUSR2",
            };
            tracing::warn!(
                signal = ignored,
                "signal ignored: otpd has no reload; restart it to apply a new configuration"
            );
        }
    })
}

fn bench_options(args: BenchArgs) -> otpd::bench::Options {
    otpd::bench::Options {
        socket: args.socket.path(),
        clients: args.clients,
        duration: args.duration,
        op: args.op,
        pipeline: args.pipeline,
        codes_file: args.codes_file,
        pid: args.pid,
        ttl_secs: args.ttl,
        total: args.total,
        preload: args.preload,
        idle_connections: args.idle_connections,
        slow_writers: args.slow_writers,
    }
}

async fn run_client(command: Command) -> anyhow::Result<ExitCode> {
    let (socket, request) = match command {
        Command::Serve { .. } | Command::Bench(_) => {
            unreachable!("handled in main")
        }
        Command::Create {
            token,
            sms,
            messenger,
            ttl,
            code_length,
            socket,
        } => {
            let mut to = serde_json::Map::new();
            if let Some(sms) = sms {
                to.insert("sms".into(), sms.into());
            }
            if let Some(messenger) = messenger {
                to.insert("messenger".into(), messenger.into());
            }
            let mut request = json!({"op": "create", "token": token.token, "to": to});
            if let Some(ttl) = ttl {
                request["ttl_secs"] = ttl.into();
            }
            if let Some(code_length) = code_length {
                request["code_length"] = code_length.into();
            }
            (socket, request)
        }
        Command::Verify {
            token,
            code,
            socket,
        } => (
            socket,
            json!({"op": "verify", "token": token.token, "code": code}),
        ),
        Command::Cancel { token, socket } => {
            (socket, json!({"op": "cancel", "token": token.token}))
        }
        Command::Status { token, socket } => {
            (socket, json!({"op": "status", "token": token.token}))
        }
        Command::Stats { socket } => (socket, json!({"op": "stats"})),
        Command::Ping { socket } => (socket, json!({"op": "ping"})),
    };
    let mut client = Client::connect(&socket.path()).await?;
    // A create is answered once its provider's retries are done, which the daemon
    // bounds by its [delivery] settings, unknown here: it is waited for. Any other
    // answer is quick, and only a daemon that has stopped answering meets the limit.
    let response = if request["op"] == "create" {
        client.call(&request).await?
    } else {
        tokio::time::timeout(CLIENT_PATIENCE, client.call(&request))
            .await
            .map_err(|_| anyhow::anyhow!("otpd did not answer within {CLIENT_PATIENCE:?}"))??
    };
    println!("{response}");
    Ok(if response.get("ok") == Some(&Value::Bool(true)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` describes every argument of every subcommand.
    #[test]
    fn every_argument_says_what_it_is() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for command in cli.get_subcommands() {
            for arg in command.get_arguments() {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    !help.trim().is_empty(),
                    "otpd {} {}: no help",
                    command.get_name(),
                    arg.get_id()
                );
            }
        }
        let serve = cli.find_subcommand("serve").unwrap();
        let data_dir = serve.get_arguments().find(|a| a.get_id() == "data_dir");
        let help = data_dir.unwrap().get_help().unwrap().to_string();
        assert!(help.contains("otpd.sock"), "{help}");
    }
}
