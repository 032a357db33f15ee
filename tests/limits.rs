//! Connection limits through the real socket: `max_request_bytes` bounds a line (its
//! CRLF aside), `max_connections` answers 503 `busy`, `idle_timeout_secs` closes silent
//! connections (not busy ones) and cuts off a slow writer, and the daemon keeps serving
//! well-behaved clients throughout.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::Daemon;
use serde_json::json;

const IDLE_1S: &str = "[server]\nidle_timeout_secs = 1\n";

/// A connection the daemon serves: slots of connections just closed (the harness's
/// own readiness probe, say) free up as soon as the daemon notices, so retry until then.
fn served(daemon: &Daemon) -> common::Conn {
    for _ in 0..500 {
        let mut conn = daemon.connect();
        if conn
            .try_call(&json!({"op": "ping"}))
            .is_some_and(|answer| answer["status"] == 200)
        {
            return conn;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("the daemon never served a new connection");
}

#[test]
fn connections_over_the_limit_are_told_busy() {
    let daemon = Daemon::start("[server]\nmax_connections = 3\n");
    let held: Vec<_> = (0..3).map(|_| served(&daemon)).collect();
    let mut extra = daemon.connect();
    let answer = extra.receive().expect("a busy answer");
    assert_eq!(answer["status"], 503, "{answer}");
    assert_eq!(answer["error"], "busy");
    assert!(extra.is_closed());

    drop(held);
    served(&daemon);
}

#[test]
fn a_line_of_max_request_bytes_is_served_whether_it_ends_in_lf_or_crlf() {
    let daemon = Daemon::start("[server]\nmax_request_bytes = 1024\n");
    // A ping padded with JSON whitespace to exactly the limit.
    let line = |length: usize, terminator: &[u8]| {
        let mut line = format!("{:<length$}", "{\"op\":\"ping\"}").into_bytes();
        line.extend_from_slice(terminator);
        line
    };
    let mut conn = daemon.connect();
    for terminator in [&b"\n"[..], b"\r\n"] {
        conn.send_raw(&line(1024, terminator));
        let answer = conn.receive().expect("an answer");
        assert_eq!(answer["status"], 200, "{terminator:?}: {answer}");
    }
    conn.send_raw(&line(1025, b"\r\n"));
    let answer = conn.receive().expect("an answer");
    assert_eq!(answer["status"], 413, "{answer}");
}

#[test]
fn idle_connections_are_closed() {
    let daemon = Daemon::start(IDLE_1S);
    let mut idle = served(&daemon); // served first: not closed at once
    assert!(idle.is_closed(), "an idle connection stays open");
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
}

#[test]
fn a_connection_in_use_outlives_the_idle_timeout() {
    let daemon = Daemon::start(IDLE_1S);
    let mut conn = served(&daemon);
    // A request every 200 ms for 2.4 s: never 1 s idle, over twice the timeout in all.
    for _ in 0..12 {
        thread::sleep(Duration::from_millis(200));
        let answer = conn.try_call(&json!({"op": "ping"}));
        assert!(
            answer.is_some_and(|answer| answer["status"] == 200),
            "a connection in use was closed"
        );
    }
}

#[test]
fn a_slow_writer_is_cut_off_mid_line() {
    let daemon = Daemon::start(IDLE_1S);
    let stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    // One byte every 100 ms of a line that would take 10 s: never a whole request.
    let dribble = thread::spawn({
        let written = written.clone();
        move || {
            for byte in b"{\"op\":\"ping\",\"pad\":\""
                .iter()
                .chain([b'x'; 80].iter())
            {
                if writer.write_all(&[*byte]).is_err() {
                    return;
                }
                written.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(100));
            }
        }
    });
    let mut conn = common::Conn::new(stream);
    assert!(conn.is_closed(), "the slow writer got an answer");
    let at_close = written.load(Ordering::Relaxed);
    assert!(at_close < 100, "closed only after {at_close} bytes");
    // Meanwhile and afterwards, other clients are served.
    assert_eq!(daemon.call(json!({"op": "ping"}))["status"], 200);
    dribble.join().unwrap();
}

#[test]
fn a_low_open_file_limit_is_raised_so_every_allowed_connection_is_served() {
    let mut daemon = Daemon::prepare("", "[server]\nmax_connections = 100\n", "");
    // A soft limit of 64 descriptors, as a shell with `ulimit -Sn 64` would pass on.
    let mut command = daemon.command("sh");
    command
        .args(["-c", "ulimit -Sn 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_otpd"))
        .args(daemon.serve_args());
    daemon.launch(command);
    daemon.wait_until_ready();

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line")
        .split_whitespace()
        .collect();
    let (soft, hard) = (open_files[3], open_files[4]);
    assert_eq!(
        soft, hard,
        "the soft limit was raised to the hard one: {limits}"
    );
    assert_ne!(soft, "64");

    // 90 connections at once, more than 64 descriptors: `served` fails unless each is.
    let _held: Vec<_> = (0..90).map(|_| served(&daemon)).collect();
}

#[test]
fn a_client_that_never_reads_does_not_hold_up_shutdown() {
    let mut daemon = Daemon::start(""); // idle_timeout_secs: the default 60
    let peer = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    // Far more answers than the socket buffers hold, none of them read. Writing blocks
    // once the daemon, stuck writing answers, stops reading: hence its own thread.
    let written = Arc::new(AtomicUsize::new(0));
    let mut writer = peer.try_clone().unwrap();
    let progress = written.clone();
    thread::spawn(move || {
        let chunk = "{\"op\":\"ping\"}\n".repeat(1_000);
        while writer.write_all(chunk.as_bytes()).is_ok() {
            progress.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    let mut last = 0;
    common::wait_for("the daemon to stop taking requests", || {
        thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::Relaxed);
        std::mem::replace(&mut last, now) == now && now > 0
    });
    // Waiting out the peer's 60 s idle timeout would overrun `stop`'s 30 s patience.
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    drop(peer);
}

#[test]
fn answers_that_fill_the_socket_buffer_all_arrive_once_the_client_reads() {
    let daemon = Daemon::start("");
    let mut conn = daemon.connect();
    let mut writer = conn.try_clone_writer();
    let requests = 30_000;
    // The daemon stops reading once its answers fill the socket, so the requests are
    // written from a thread of their own, which then blocks too.
    let written = Arc::new(AtomicUsize::new(0));
    let progress = written.clone();
    let sender = thread::spawn(move || {
        for id in 0..requests {
            let line = format!("{{\"op\":\"ping\",\"id\":{id}}}\n");
            writer.write_all(line.as_bytes()).unwrap();
            progress.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut last = 0;
    common::wait_for("the daemon to stop taking requests", || {
        thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::Relaxed);
        std::mem::replace(&mut last, now) == now && now > 0
    });
    assert!(last < requests, "the socket never filled");
    for id in 0..requests {
        let answer = conn.receive().expect("an answer");
        assert_eq!(
            (answer["id"].as_u64(), answer["status"].as_u64()),
            (Some(id as u64), Some(200))
        );
    }
    sender.join().unwrap();
}

#[test]
fn the_client_tools_show_the_busy_answer() {
    let daemon = Daemon::start("[server]\nmax_connections = 1\n");
    let _held = served(&daemon);
    // Turned away before it is read, the request often meets a closed pipe; the answer
    // waits all the same.
    for _ in 0..20 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_otpd"))
            .args(["ping", "--socket"])
            .arg(&daemon.socket)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("\"busy\""), "{stdout}{out:?}");
        assert_eq!(
            out.status.code(),
            Some(1),
            "a refusal, not a failure to talk"
        );
    }
}
