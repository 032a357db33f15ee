//! `otpd bench`: a load client that measures a running daemon through its socket.
//!
//! Each client task owns one connection and runs its op in a loop: `create` (a distinct
//! token and SMS number per request, so rate limits never refuse), `verify` (codes
//! created in an untimed preload phase), or `mixed` (create, then verify the code just
//! sent). Codes are learnt from the `log` delivery backend's `log_file`, which the daemon
//! writes before it answers the create. Optional idle connections and one-byte-a-second
//! writers load the server's connection handling at the same time (the abuse run).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::client::Client;

/// What each client does in a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// Create codes, each for a new token and number.
    Create,
    /// Verify codes created before the run (`--preload`).
    Verify,
    /// Create codes, then verify them.
    Mixed,
}

/// The benchmark's parameters (see `otpd bench --help`).
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub clients: usize,
    pub duration: Duration,
    pub op: Op,
    /// Requests sent back to back before their answers are read.
    pub pipeline: usize,
    /// The daemon's `[delivery] log_file`; needed by `verify` and `mixed`.
    pub codes_file: Option<PathBuf>,
    /// Daemon process for the RSS figures; found from the socket when not given.
    pub pid: Option<u32>,
    /// `ttl_secs` asked for on each create (the daemon's default when unset).
    pub ttl_secs: Option<u64>,
    /// Stop after this many timed requests in all (also when the duration is not over).
    pub total: Option<u64>,
    /// Codes created before a `verify` run (spread over the clients).
    pub preload: usize,
    /// Connections opened and left silent during the run.
    pub idle_connections: usize,
    /// Connections that send one byte a second and never finish a line.
    pub slow_writers: usize,
}

/// Parses `500ms`, `10s`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with ms, s or m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?}: too long")),
        _ => Err(format!("{text:?}: unit must be ms, s or m")),
    }
}

/// Codes read from the log backend's JSON-lines file, by token (also used by the
/// integration tests that create many codes).
pub struct CodeBook {
    inner: Mutex<CodeBookInner>,
}

struct CodeBookInner {
    file: File,
    partial: Vec<u8>,
    codes: HashMap<String, String>,
}

#[derive(serde::Deserialize)]
struct LoggedCode {
    token: String,
    code: String,
}

impl CodeBook {
    /// Follows `path` from its current end: earlier runs' codes are never read.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("--codes-file {}", path.display()))?;
        file.seek(SeekFrom::End(0))?;
        Ok(Self {
            inner: Mutex::new(CodeBookInner {
                file,
                partial: Vec::new(),
                codes: HashMap::new(),
            }),
        })
    }

    /// The code sent for `token`, reading what the daemon appended since the last call.
    pub fn take(&self, token: &str) -> anyhow::Result<Option<String>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(code) = inner.codes.remove(token) {
            return Ok(Some(code));
        }
        let CodeBookInner {
            file,
            partial,
            codes,
        } = &mut *inner;
        file.read_to_end(partial)?;
        let complete = partial
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        for line in partial[..complete].split(|&b| b == b'\n') {
            if let Some(logged) = read_logged(line) {
                codes.insert(logged.token, logged.code);
            }
        }
        partial.drain(..complete);
        Ok(codes.remove(token))
    }
}

/// The code a `log_file` line holds. A daemon killed in the middle of writing a line
/// (a fatal signal can cut a write between pages) leaves it torn, and the next
/// daemon's first line continues it: that line is then read from where it begins.
fn read_logged(line: &[u8]) -> Option<LoggedCode> {
    const LINE_START: &[u8] = b"{\"token\":";
    (0..line.len())
        .filter(|&at| line[at..].starts_with(LINE_START))
        .find_map(|at| serde_json::from_slice(&line[at..]).ok())
}

/// Latencies (µs) and answer statuses of one op.
#[derive(Debug, Default)]
struct Samples {
    micros: Vec<u32>,
    statuses: HashMap<u64, u64>,
}

impl Samples {
    fn record(&mut self, started: Instant, answer: &Value) {
        let micros = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        self.micros.push(micros);
        let status = answer["status"].as_u64().unwrap_or(0);
        *self.statuses.entry(status).or_default() += 1;
    }

    fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
    }
}

/// Per-client results: one sample set per op name.
#[derive(Default)]
struct ClientResult {
    create: Samples,
    verify: Samples,
    ran_dry: bool,
}

/// Names requests uniquely across runs: tokens `bench-<run>-<n>` and SMS numbers
/// `4<run:5><n:9>` (15 digits), so neither per-token nor per-recipient limits apply.
/// `n` is the request's index scattered over `0..10⁹` ([`scatter`]): real tokens and
/// numbers come in no order, and names in sorted order would let the store's trees
/// insert and look up along cache-warm paths (9–13 % more requests a second than
/// scattered names, at 9–10 µs less CPU a request: BENCHMARKS.md, "Stop 23").
struct Names {
    run: u32,
    next: AtomicU64,
}

impl Names {
    fn new() -> Self {
        Self {
            run: rand::random_range(10_000..100_000),
            next: AtomicU64::new(0),
        }
    }

    fn create_line(&self, ttl_secs: Option<u64>) -> (String, Vec<u8>) {
        let n = scatter(self.next.fetch_add(1, Ordering::Relaxed));
        let token = format!("bench-{}-{n}", self.run);
        let ttl = ttl_secs.map_or(String::new(), |t| format!(",\"ttl_secs\":{t}"));
        let line = format!(
            "{{\"op\":\"create\",\"token\":\"{token}\",\"to\":{{\"sms\":\"4{}{n:09}\"}}{ttl}}}\n",
            self.run
        );
        (token, line.into_bytes())
    }
}

/// The `index`th of a run's names, `0..10⁹`: the same for no two indexes below 10⁹
/// (the factor, 3¹⁸, shares no prime with 10⁹), and no two consecutive ones near each
/// other.
fn scatter(index: u64) -> u64 {
    const SPAN: u64 = 1_000_000_000;
    (index % SPAN) * 387_420_489 % SPAN
}

fn verify_line(token: &str, code: &str) -> Vec<u8> {
    format!("{{\"op\":\"verify\",\"token\":\"{token}\",\"code\":\"{code}\"}}\n").into_bytes()
}

/// Shared state of the timed phase.
struct Run {
    options: Options,
    names: Names,
    codes: Option<CodeBook>,
    /// Set when the timed phase starts (after any preload).
    deadline: std::sync::OnceLock<Instant>,
    issued: AtomicU64,
}

impl Run {
    /// Claims `n` more timed requests; false once the time or the total is used up.
    fn claim(&self, n: usize) -> bool {
        if self.deadline.get().is_none_or(|d| Instant::now() >= *d) {
            return false;
        }
        match self.options.total {
            Some(total) => self.issued.fetch_add(n as u64, Ordering::Relaxed) < total,
            None => true,
        }
    }

    fn code(&self, token: &str) -> anyhow::Result<String> {
        let book = self.codes.as_ref().context("no --codes-file")?;
        book.take(token)?
            .with_context(|| format!("no code logged for {token} in --codes-file"))
    }
}

/// Sends `lines` back to back, then reads one answer per line into `samples`.
async fn batch(
    client: &mut Client,
    lines: &[Vec<u8>],
    samples: &mut Samples,
) -> anyhow::Result<Vec<Value>> {
    let started = Instant::now();
    for line in lines {
        client.send_line(line).await?;
    }
    let mut answers = Vec::with_capacity(lines.len());
    for _ in lines {
        let answer = client.receive().await?;
        samples.record(started, &answer);
        answers.push(answer);
    }
    Ok(answers)
}

/// Creates codes for `count` tokens, untimed; returns the tokens that got one. Stops
/// at a round in which the daemon created none (it refuses them all), naming why.
async fn preload(run: &Run, client: &mut Client, count: usize) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(count);
    let mut scratch = Samples::default();
    while tokens.len() < count {
        let n = (count - tokens.len()).min(64);
        let (names, lines): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| run.names.create_line(run.options.ttl_secs))
            .unzip();
        let answers = batch(client, &lines, &mut scratch).await?;
        let before = tokens.len();
        tokens.extend(
            names
                .into_iter()
                .zip(&answers)
                .filter(|(_, a)| a["status"] == 201)
                .map(|(t, _)| t),
        );
        if tokens.len() == before {
            anyhow::bail!(
                "the daemon refused every create while preloading: {}",
                answers[0]
            );
        }
    }
    Ok(tokens)
}

/// One client's timed loop.
async fn client_loop(
    run: &Run,
    mut client: Client,
    mut pool: Vec<String>,
) -> anyhow::Result<ClientResult> {
    let mut result = ClientResult::default();
    let depth = run.options.pipeline;
    pool.reverse();
    while run.claim(depth) {
        let verify_tokens = match run.options.op {
            Op::Verify => {
                if pool.len() < depth {
                    result.ran_dry = true;
                    break;
                }
                pool.split_off(pool.len() - depth)
            }
            Op::Create | Op::Mixed => {
                let (tokens, lines): (Vec<_>, Vec<_>) = (0..depth)
                    .map(|_| run.names.create_line(run.options.ttl_secs))
                    .unzip();
                let answers = batch(&mut client, &lines, &mut result.create).await?;
                if run.options.op == Op::Create {
                    continue;
                }
                tokens
                    .into_iter()
                    .zip(answers)
                    .filter(|(_, a)| a["status"] == 201)
                    .map(|(t, _)| t)
                    .collect()
            }
        };
        let lines = verify_tokens
            .iter()
            .map(|token| Ok(verify_line(token, &run.code(token)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        batch(&mut client, &lines, &mut result.verify).await?;
    }
    Ok(result)
}

/// Connections that stay silent, and ones that dribble a never-ending line.
struct Abuse {
    idle: Vec<UnixStream>,
    cut_off: Arc<AtomicUsize>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Abuse {
    async fn start(options: &Options) -> anyhow::Result<Self> {
        let mut idle = Vec::with_capacity(options.idle_connections);
        for _ in 0..options.idle_connections {
            idle.push(UnixStream::connect(&options.socket).await?);
        }
        let cut_off = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::with_capacity(options.slow_writers);
        for _ in 0..options.slow_writers {
            let mut stream = UnixStream::connect(&options.socket).await?;
            let cut_off = cut_off.clone();
            writers.push(tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_secs(1));
                loop {
                    interval.tick().await;
                    if stream.write_all(b"x").await.is_err() {
                        cut_off.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }));
        }
        Ok(Self {
            idle,
            cut_off,
            writers,
        })
    }

    fn stop(self) -> usize {
        for writer in &self.writers {
            writer.abort();
        }
        drop(self.idle);
        self.cut_off.load(Ordering::Relaxed)
    }
}

/// Resident and peak memory of a process, from /proc.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Memory {
        rss_kib: proc_field(&status, "VmRSS:")?,
        hwm_kib: proc_field(&status, "VmHWM:")?,
    })
}

/// The number after `name` on its line of a /proc file (`VmRSS:   1234 kB`).
fn proc_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Bytes a process has had written to storage so far (`write_bytes` of `/proc/<pid>/io`):
/// for otpd its journal, its tables and their compactions, and the `log` backend's
/// file. On a disk that throttles, these decide the p99 (BENCHMARKS.md, "Stop 23").
fn bytes_written(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    proc_field(&io, "write_bytes:")
}

/// The daemon's writes to storage over the timed phase, in all and per request.
fn print_written(before: u64, after: u64, requests: usize) {
    let written = after.saturating_sub(before);
    println!(
        "daemon disk writes: {:.1} MB, {} bytes a request",
        written as f64 / 1e6,
        written / requests.max(1) as u64
    );
}

/// CPU time a process has used so far, in user space and in the kernel.
#[derive(Clone, Copy)]
struct CpuTime {
    user: Duration,
    system: Duration,
}

/// [`CpuTime`] of `pid`, from `/proc/<pid>/stat` (all its threads).
fn cpu_time(pid: u32) -> Option<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    // The kernel reports in USER_HZ, 100 on every Linux architecture otpd targets.
    let mut next = || {
        Some(Duration::from_millis(
            fields.next()?.parse::<u64>().ok()? * 10,
        ))
    };
    Some(CpuTime {
        user: next()?,
        system: next()?,
    })
}

/// The daemon's CPU over the timed phase: in all, and per request split into user
/// space and kernel, the figures to hold against Redis's (`.ci/bench throughput`).
fn print_cpu(before: CpuTime, after: CpuTime, elapsed: Duration, requests: usize) {
    let user = after.user.saturating_sub(before.user);
    let system = after.system.saturating_sub(before.system);
    let total = (user + system).as_secs_f64();
    let micros_each = |d: Duration| d.as_secs_f64() * 1e6 / requests.max(1) as f64;
    println!(
        "daemon CPU: {total:.2} s in {:.2} s ({:.0}% of one core), {:.1} µs a request: {:.1} user, {:.1} kernel",
        elapsed.as_secs_f64(),
        100.0 * total / elapsed.as_secs_f64(),
        micros_each(user + system),
        micros_each(user),
        micros_each(system),
    );
}

/// The process listening on `socket`: its inode from /proc/net/unix, then the process
/// holding a descriptor for that inode.
fn socket_owner(socket: &Path) -> Option<u32> {
    /// The Flags column of a listening socket (`__SO_ACCEPTCON`). The connections
    /// made to it are listed under its path too, and one still in the backlog is held
    /// by no process.
    const LISTENING: &str = "00010000";
    let path = std::fs::canonicalize(socket).ok()?;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() >= 8 && fields[3] == LISTENING && Path::new(fields[7]) == path)
            .then(|| fields[6].to_owned())
    })?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|proc_dir| {
            let pid: u32 = proc_dir.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(proc_dir.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
                })
                .then_some(pid)
        })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn print_op(name: &str, mut samples: Samples, elapsed: Duration) {
    if samples.micros.is_empty() {
        return;
    }
    samples.micros.sort_unstable();
    let s = &samples.micros;
    let mut statuses: Vec<_> = samples.statuses.into_iter().collect();
    statuses.sort();
    let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    println!(
        "{name:<7} {:>8} req {:>9.0} ops/s  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  [{}]",
        s.len(),
        s.len() as f64 / elapsed.as_secs_f64(),
        percentile(s, 50.0),
        percentile(s, 90.0),
        percentile(s, 99.0),
        percentile(s, 100.0),
        statuses.join(" ")
    );
}

fn print_memory(label: &str, memory: Option<Memory>) {
    if let Some(m) = memory {
        println!(
            "daemon RSS {label}: {:.1} MiB (peak {:.1} MiB)",
            m.rss_kib as f64 / 1024.0,
            m.hwm_kib as f64 / 1024.0
        );
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(options.pipeline > 0, "--pipeline must be at least 1");
    let mut clients = Vec::with_capacity(options.clients);
    for _ in 0..options.clients {
        clients.push(Client::connect(&options.socket).await?);
    }
    // The socket takes connections before the daemon serves them; once it answers, it
    // has opened (and created) its log_file.
    clients[0].call(&serde_json::json!({"op": "ping"})).await?;
    let codes = match (&options.codes_file, options.op) {
        (Some(path), _) => Some(CodeBook::open(path)?),
        (None, Op::Create) => None,
        (None, _) => anyhow::bail!(
            "--codes-file is required for --op verify and mixed: the daemon's [delivery] log_file"
        ),
    };
    let pid = options.pid.or_else(|| socket_owner(&options.socket));
    let run = Arc::new(Run {
        names: Names::new(),
        codes,
        deadline: std::sync::OnceLock::new(),
        issued: AtomicU64::new(0),
        options,
    });

    let loaded = preload_all(&run, clients).await?;
    let abuse = Abuse::start(&run.options).await?;
    print_memory("before", pid.and_then(memory));
    let cpu_before = pid.and_then(cpu_time);
    let written_before = pid.and_then(bytes_written);

    let started = Instant::now();
    run.deadline
        .set(started + run.options.duration)
        .expect("set once");
    let tasks: Vec<_> = loaded
        .into_iter()
        .map(|(client, pool)| {
            let run = run.clone();
            tokio::spawn(async move { client_loop(&run, client, pool).await })
        })
        .collect();
    let mut timed = Timed::default();
    for task in tasks {
        let result = task.await??;
        timed.create.merge(result.create);
        timed.verify.merge(result.verify);
        timed.ran_dry += usize::from(result.ran_dry);
    }
    let elapsed = started.elapsed();
    let cut_off = abuse.stop();
    let requests = print_report(&run.options, timed, elapsed, cut_off);
    if let (Some(before), Some(after)) = (cpu_before, pid.and_then(cpu_time)) {
        print_cpu(before, after, elapsed, requests);
    }
    if let (Some(before), Some(after)) = (written_before, pid.and_then(bytes_written)) {
        print_written(before, after, requests);
    }
    match pid {
        Some(pid) => print_memory("after", memory(pid)),
        None => println!("daemon RSS: unknown (not local, or pass --pid)"),
    }
    Ok(())
}

/// Gives each client its share of `--preload` codes (for `--op verify`), all at once.
async fn preload_all(
    run: &Arc<Run>,
    clients: Vec<Client>,
) -> anyhow::Result<Vec<(Client, Vec<String>)>> {
    let share = match run.options.op {
        Op::Verify => run.options.preload.div_ceil(run.options.clients),
        Op::Create | Op::Mixed => 0,
    };
    let preloads: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let run = run.clone();
            tokio::spawn(async move {
                let pool = preload(&run, &mut client, share).await?;
                anyhow::Ok((client, pool))
            })
        })
        .collect();
    let mut loaded = Vec::with_capacity(preloads.len());
    for task in preloads {
        loaded.push(task.await??);
    }
    if share > 0 {
        let codes: usize = loaded.iter().map(|(_, pool)| pool.len()).sum();
        println!("preloaded {codes} codes");
    }
    Ok(loaded)
}

/// What the clients measured in the timed phase, together.
#[derive(Default)]
struct Timed {
    create: Samples,
    verify: Samples,
    /// Clients that used up their preloaded codes before the end.
    ran_dry: usize,
}

/// Prints the timed phase's latencies and rates; returns how many requests it made.
fn print_report(o: &Options, timed: Timed, elapsed: Duration, cut_off: usize) -> usize {
    println!(
        "otpd bench: op {:?}, {} clients, pipeline {}, {:.2} s{}",
        o.op,
        o.clients,
        o.pipeline,
        elapsed.as_secs_f64(),
        if o.idle_connections + o.slow_writers > 0 {
            format!(
                ", {} idle connections, {} slow writers ({cut_off} cut off)",
                o.idle_connections, o.slow_writers
            )
        } else {
            String::new()
        }
    );
    let total = timed.create.micros.len() + timed.verify.micros.len();
    print_op("create", timed.create, elapsed);
    print_op("verify", timed.verify, elapsed);
    println!(
        "total   {total:>8} req {:>9.0} ops/s",
        total as f64 / elapsed.as_secs_f64()
    );
    if timed.ran_dry > 0 {
        println!(
            "{} clients used up their preloaded codes early: raise --preload",
            timed.ran_dry
        );
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn the_socket_owner_is_the_listener_not_a_connection_waiting_to_be_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otpd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Connections in the backlog are listed under the socket's path too, by no
        // process until one accepts them.
        let _waiting: Vec<_> = (0..16)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        assert_eq!(socket_owner(&path), Some(std::process::id()));
    }

    #[test]
    fn a_line_torn_by_a_killed_daemon_loses_only_its_own_code() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codes.jsonl");
        std::fs::write(&path, b"").unwrap();
        let book = CodeBook::open(&path).unwrap();
        let lines = concat!(
            r#"{"token":"a","code":"111111","text":"111111 is {\"token\": yours"}"#,
            "\n",
            r#"{"token":"b","code":"2222"#, // killed here; the next start goes on
            r#"{"token":"c","code":"333333","text":"333333"}"#,
            "\n",
        );
        std::fs::write(&path, lines).unwrap();
        assert_eq!(book.take("a").unwrap().as_deref(), Some("111111"));
        assert_eq!(book.take("b").unwrap(), None);
        assert_eq!(book.take("c").unwrap().as_deref(), Some("333333"));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).map(|n| n * 1000).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 100.0), 100.0);
    }

    #[test]
    fn proc_fields_are_read_by_name() {
        let io = "rchar: 10\ncancelled_write_bytes: 7\nwrite_bytes: 4096\n";
        assert_eq!(proc_field(io, "write_bytes:"), Some(4096));
        let status = "Name:\totpd\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(proc_field(status, "VmRSS:"), Some(1024));
        assert_eq!(proc_field(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_has_a_write_count() {
        assert!(bytes_written(std::process::id()).is_some());
    }

    #[test]
    fn scattered_indexes_are_distinct_and_far_apart() {
        let scattered: Vec<u64> = (0..200_000).map(scatter).collect();
        let distinct: std::collections::HashSet<_> = scattered.iter().collect();
        assert_eq!(distinct.len(), scattered.len());
        assert!(scattered.iter().all(|&n| n < 1_000_000_000));
        assert!(
            scattered
                .windows(2)
                .all(|w| w[0].abs_diff(w[1]) > 1_000_000)
        );
    }

    #[test]
    fn names_are_valid_and_distinct() {
        let names = Names::new();
        let (a, line_a) = names.create_line(Some(60));
        let (b, _) = names.create_line(None);
        assert_ne!(a, b);
        let parsed: Value = serde_json::from_slice(&line_a).unwrap();
        assert_eq!(parsed["sms"].as_str().map(str::len), None);
        assert_eq!(parsed["to"]["sms"].as_str().unwrap().len(), 15);
        assert_eq!(parsed["ttl_secs"], 60);
    }
}
