//! otpd under systemd's protocols, exercised for real: socket activation through
//! `systemd-socket-activate`, `sd_notify` datagrams on a socket the test binds as
//! `NOTIFY_SOCKET`, and the journal's stream format.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Conn, Daemon, OwnedRedis, PATIENCE, wait_for};
use serde_json::json;

/// Waits (at most [`PATIENCE`]) until `path` exists.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (at most [`PATIENCE`]) until a stream socket at `path` accepts a connection
/// (the file appears at `bind`, a moment before `listen`); returns that connection.
fn connect_when_listening(path: &Path) -> UnixStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return stream,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{} never listened: {e}",
                path.display()
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The inode of the socket listening at `path`, from /proc/net/unix (whose rows for
/// accepted connections carry the path too, without the listening flag).
fn listening_inode(path: &Path) -> Option<u64> {
    const ACCEPTING: u32 = 0x0001_0000; // __SO_ACCEPTCON
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(fields[3], 16).unwrap();
        (flags & ACCEPTING != 0 && fields.get(7) == Some(&path.to_str().unwrap()))
            .then(|| fields[6].parse().unwrap())
    })
}

/// Starts otpd through `systemd-socket-activate OPTIONS`, which runs it on the first
/// connection to (or datagram on) its first socket.
fn launch_activated(daemon: &mut Daemon, options: &[&OsStr]) {
    let mut activate = daemon.command("systemd-socket-activate");
    activate
        .args(options)
        .arg("--setenv=OTPD_LOG=info")
        .arg(env!("CARGO_BIN_EXE_otpd"))
        .args(daemon.serve_args());
    daemon.launch(activate);
}

#[test]
fn socket_activation_serves_on_fd_3_and_leaves_the_socket_file() {
    let mut daemon = Daemon::prepare("", "", "");
    let socket = daemon.socket.clone();
    launch_activated(&mut daemon, &["--listen".as_ref(), socket.as_ref()]);

    // The first connection makes systemd-socket-activate exec otpd with the socket.
    let mut first = Conn::new(connect_when_listening(&daemon.socket));
    let answer = first.call(json!({"op": "ping"}));
    assert_eq!(answer["status"], 200, "{answer}");

    let fd3 = std::fs::read_link(format!("/proc/{}/fd/3", daemon.pid())).unwrap();
    let inode = listening_inode(&daemon.socket).expect("the socket is in /proc/net/unix");
    assert_eq!(fd3.to_str().unwrap(), format!("socket:[{inode}]"));
    assert!(
        daemon.stderr().contains("using the socket systemd passed"),
        "{}",
        daemon.stderr()
    );
    let mut conn = daemon.connect();
    let code = daemon.create_code("activated", "393331234567");
    assert_eq!(
        conn.call(json!({"op": "verify", "token": "activated", "code": code}))["status"],
        200
    );

    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let meta = std::fs::symlink_metadata(&daemon.socket).expect("the socket file is kept");
    assert!(meta.file_type().is_socket());
}

/// An abstract socket (`ListenStream=@name`) has no path: the logs name it `@name`,
/// not the path otpd would have bound itself.
#[test]
fn an_activated_abstract_socket_is_named_in_the_log() {
    use std::os::linux::net::SocketAddrExt;
    let mut daemon = Daemon::prepare("", "", "");
    // The temp dir's name: unique among the tests running at once.
    let name = format!(
        "otpd-{}",
        daemon.dir.path().file_name().unwrap().to_str().unwrap()
    );
    let listen = format!("--listen=@{name}");
    launch_activated(&mut daemon, &[listen.as_ref()]);
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let mut stream = None;
    wait_for("the abstract socket", || {
        stream = UnixStream::connect_addr(&address).ok();
        stream.is_some()
    });
    let mut conn = Conn::new(stream.unwrap());
    assert_eq!(conn.call(json!({"op": "ping"}))["status"], 200);
    // The socket answers before the ready line is written.
    wait_for("the ready line", || daemon.stderr().contains("live=0"));
    let log = daemon.stderr();
    let named: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("socket="))
        .collect();
    assert_eq!(named.len(), 2, "taken, then ready: {log}");
    assert!(named[0].contains(&format!("socket=@{name}")), "{log}");
    assert!(
        named[1].contains(&format!("socket=@{name} live=0")),
        "{log}"
    );
    assert!(daemon.stop().success(), "{}", daemon.stderr());
}

/// Waits for otpd to stop with status 2, having said `why`.
fn exits_refusing(daemon: &mut Daemon, why: &str) {
    assert_eq!(daemon.wait_exit().code(), Some(2), "{}", daemon.stderr());
    assert!(daemon.stderr().contains(why), "{}", daemon.stderr());
}

#[test]
fn two_activated_sockets_are_refused() {
    let mut daemon = Daemon::prepare("", "", "");
    let (first, second) = (daemon.socket.clone(), daemon.dir.path().join("second.sock"));
    let options = [
        "--listen".as_ref(),
        first.as_ref(),
        "--listen".as_ref(),
        second.as_ref(),
    ];
    launch_activated(&mut daemon, &options);
    wait_for_file(&second);
    let _trigger = connect_when_listening(&first);
    exits_refusing(&mut daemon, "systemd passed 2 sockets");
}

#[test]
fn an_activated_datagram_socket_is_refused() {
    let mut daemon = Daemon::prepare("", "", "");
    let socket = daemon.socket.clone();
    launch_activated(
        &mut daemon,
        &["--datagram".as_ref(), "--listen".as_ref(), socket.as_ref()],
    );
    wait_for_file(&socket);
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"hello", &socket)
        .unwrap();
    exits_refusing(&mut daemon, "not a listening stream socket");
}

/// A socket the test binds as `NOTIFY_SOCKET`, collecting what otpd sends.
struct NotifySocket {
    socket: UnixDatagram,
    /// Every datagram received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> (NotifySocket, std::path::PathBuf) {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        (
            NotifySocket {
                socket,
                seen: Vec::new(),
            },
            path,
        )
    }

    /// Counts the datagrams with the line `line` received for `window`.
    fn count_for(&mut self, line: &str, window: Duration) -> usize {
        let end = Instant::now() + window;
        let mut buf = vec![0; 4096];
        let mut count = 0;
        while let Some(left) = end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            self.socket.set_read_timeout(Some(left)).unwrap();
            let Ok(len) = self.socket.recv(&mut buf) else {
                break;
            };
            let message = String::from_utf8(buf[..len].to_vec()).unwrap();
            count += usize::from(message.lines().any(|l| l == line));
            self.seen.push(message);
        }
        self.socket.set_read_timeout(Some(PATIENCE)).unwrap();
        count
    }

    /// Receives datagrams until one has the line `line`; returns that datagram.
    fn wait_for(&mut self, line: &str) -> String {
        let mut buf = vec![0; 4096];
        loop {
            let len = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {line} (got {:?}): {e}", self.seen));
            let message = String::from_utf8(buf[..len].to_vec()).unwrap();
            self.seen.push(message.clone());
            if message.lines().any(|l| l == line) {
                return message;
            }
        }
    }
}

#[test]
fn ready_once_answering_and_stopping_on_sigterm() {
    let mut daemon = Daemon::prepare("", "", "");
    let (mut notify, path) = NotifySocket::bind(daemon.dir.path());
    let mut serve = daemon.serve_command();
    serve.env("NOTIFY_SOCKET", &path);
    daemon.launch(serve);

    let ready = notify.wait_for("READY=1");
    // At the moment READY=1 arrives the socket must answer at the first try.
    let stream = UnixStream::connect(&daemon.socket).expect("socket exists once READY=1");
    let answer = Conn::new(stream).call(json!({"op": "ping"}));
    assert_eq!(answer["status"], 200, "{answer}");
    assert!(
        ready.contains(&format!("STATUS=serving on {}", daemon.socket.display())),
        "{ready}"
    );
    assert!(
        notify.seen[0].starts_with("STATUS=opening the store"),
        "{:?}",
        notify.seen
    );

    assert!(daemon.stop().success(), "{}", daemon.stderr());
    let stopping = notify.wait_for("STOPPING=1");
    assert!(stopping.contains("STATUS=shutting down"), "{stopping}");
    // No WATCHDOG_USEC, no watchdog pings.
    assert!(
        !notify.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:?}",
        notify.seen
    );
}

/// Starts `daemon` with a watchdog of `interval` (`WATCHDOG_USEC`) and a notify
/// socket; returns the socket once the daemon said `READY=1`.
fn launch_with_watchdog(daemon: &mut Daemon, interval: Duration) -> NotifySocket {
    let (mut notify, path) = NotifySocket::bind(daemon.dir.path());
    let mut serve = daemon.serve_command();
    serve
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", interval.as_micros().to_string());
    daemon.launch(serve);
    notify.wait_for("READY=1");
    notify
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    const WATCHDOG: Duration = Duration::from_secs(1);
    let mut daemon = Daemon::prepare("", "", "");
    let mut notify = launch_with_watchdog(&mut daemon, WATCHDOG);

    // Every half WATCHDOG_USEC, so about 8 in 4 s: a ping every full interval (4)
    // would let systemd kill a daemon one late ping away, a quarter (16) floods it.
    let pings = notify.count_for("WATCHDOG=1", WATCHDOG * 4);
    assert!((6..=10).contains(&pings), "{pings} pings in 4 s");
    assert!(
        daemon.stderr().contains("watchdog enabled"),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success());
}

#[test]
fn the_watchdog_keeps_otpd_running_through_a_redis_outage() {
    const WATCHDOG: Duration = Duration::from_secs(1);
    let mut redis = OwnedRedis::start();
    let store = format!(
        "[store]\nengine = \"redis\"\n[store.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let mut daemon = Daemon::prepare(&store, "", "");
    let mut notify = launch_with_watchdog(&mut daemon, WATCHDOG);
    notify.wait_for("WATCHDOG=1");

    // Redis down: a restart would not bring it back (and would fail to start), so the
    // pings go on, and the outage is logged once.
    redis.kill();
    let down = Instant::now();
    while Instant::now() - down < WATCHDOG * 3 {
        notify.wait_for("WATCHDOG=1");
    }
    let log = daemon.stderr();
    assert_eq!(log.matches("the store fails").count(), 1, "{log}");
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);

    redis.spawn();
    wait_for("the store to answer again", || {
        daemon.stderr().contains("the store answers again")
    });
    notify.wait_for("WATCHDOG=1");
    assert!(daemon.stop().success());
}

/// Starts a daemon whose `JOURNAL_STREAM` is `stream(stderr file metadata)`, creates
/// one code (a warn-level line from the log backend), stops it, returns its stderr.
fn stderr_with_journal_stream(stream: impl Fn(&std::fs::Metadata) -> String) -> String {
    let mut daemon = Daemon::prepare("", "", "");
    let mut serve = daemon.serve_command();
    let meta = std::fs::metadata(&daemon.stderr_path).unwrap();
    serve.env("JOURNAL_STREAM", stream(&meta));
    daemon.launch(serve);
    daemon.wait_until_ready();
    daemon.create_code("journal", "393331234567");
    assert!(daemon.stop().success());
    daemon.stderr()
}

/// True when `line` holds an RFC 3339 date-time such as `2026-11-26T09:40:12`.
fn has_timestamp(line: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd:dd:dd";
    line.as_bytes().windows(SHAPE.len()).any(|window| {
        window.iter().zip(SHAPE).all(|(&c, &shape)| match shape {
            b'd' => c.is_ascii_digit(),
            _ => c == shape,
        })
    })
}

#[test]
fn journal_lines_carry_priority_and_no_timestamp_or_colour() {
    let log = stderr_with_journal_stream(|meta| format!("{}:{}", meta.dev(), meta.ino()));
    assert!(!log.contains('\x1b'), "{log}");
    assert!(
        log.lines().all(|line| line.starts_with('<')),
        "every line has a priority:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6>") && l.contains("ready")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.starts_with("<4>")), "{log}");
    assert!(
        !log.lines().any(has_timestamp),
        "no timestamp of our own:\n{log}"
    );
}

#[test]
fn a_journal_stream_of_another_file_is_not_the_journal() {
    // Inherited from an ancestor whose stderr was the journal: ours is a plain file.
    let log = stderr_with_journal_stream(|meta| format!("{}:{}", meta.dev(), meta.ino() + 1));
    let ready: Vec<&str> = log.lines().filter(|l| l.contains("ready")).collect();
    assert_eq!(ready.len(), 1, "{log}");
    assert!(
        !ready[0].starts_with('<') && has_timestamp(ready[0]),
        "{log}"
    );
}
