//! Crash safety: clients create and verify while the daemon is killed with SIGKILL at
//! random moments and restarted. Every acknowledged create must still verify (or answer
//! 409 when its verify was acknowledged), and no code is ever acknowledged valid twice.
//! Run on each embedded engine (the Redis engine's durability is Redis's own).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::Engine;
use otpd::bench::CodeBook;
use serde_json::json;

const CYCLES: usize = 12;
const CLIENTS: usize = 4;

/// What the clients were told about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// Create acknowledged (201); no verify sent.
    Created(String),
    /// A verify was sent but its answer was lost in the crash: 200 or 409 later.
    VerifyInDoubt(String),
    /// A verify was acknowledged 200: the code must never be valid again.
    Verified(String),
}

struct Shared {
    known: Mutex<HashMap<String, Known>>,
    codes: CodeBook,
    violations: Mutex<Vec<String>>,
}

impl Shared {
    fn violation(&self, text: String) {
        self.violations.lock().unwrap().push(text);
    }
}

/// Creates and verifies on one connection until the daemon goes away.
fn client(daemon_socket: &std::path::Path, shared: &Shared, name: &str, stop: &AtomicBool) {
    let Ok(stream) = std::os::unix::net::UnixStream::connect(daemon_socket) else {
        return;
    };
    let mut conn = common::Conn::new(stream);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let token = format!("{name}-{n}");
        // A number per create, so no per-recipient limit applies.
        static NUMBERS: AtomicU64 = AtomicU64::new(0);
        let number = format!("49{:010}", NUMBERS.fetch_add(1, Ordering::Relaxed));
        let create = json!({"op": "create", "token": token, "to": {"sms": number}});
        let Some(answer) = conn.try_call(&create) else {
            return;
        };
        if answer["status"] != 201 {
            shared.violation(format!("create {token}: {answer}"));
            return;
        }
        let code = shared
            .codes
            .take(&token)
            .unwrap()
            .expect("the log line is written before the create is answered");
        // Verify about half the codes now; the rest are checked after the last crash.
        if rand::random_bool(0.5) {
            shared
                .known
                .lock()
                .unwrap()
                .insert(token, Known::Created(code));
            continue;
        }
        shared
            .known
            .lock()
            .unwrap()
            .insert(token.clone(), Known::VerifyInDoubt(code.clone()));
        let verify = json!({"op": "verify", "token": token, "code": code});
        let Some(answer) = conn.try_call(&verify) else {
            return;
        };
        if answer["status"] != 200 {
            shared.violation(format!("first verify of {token}: {answer}"));
            return;
        }
        shared
            .known
            .lock()
            .unwrap()
            .insert(token, Known::Verified(code));
    }
}

fn acknowledged_work_survives_sigkill(engine: Engine) {
    let mut daemon = engine.start("[otp]\nresend_cooldown_secs = 0\n");
    let shared = Arc::new(Shared {
        known: Mutex::new(HashMap::new()),
        codes: CodeBook::open(&daemon.log_file).unwrap(),
        violations: Mutex::new(Vec::new()),
    });
    for cycle in 0..CYCLES {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (shared, socket, stop) = (shared.clone(), daemon.socket.clone(), stop.clone());
                thread::spawn(move || client(&socket, &shared, &format!("c{cycle}x{i}"), &stop))
            })
            .collect();
        thread::sleep(Duration::from_millis(rand::random_range(500..4500)));
        daemon.kill();
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.join().expect("client thread");
        }
        daemon.spawn();
    }

    let known = shared.known.lock().unwrap().clone();
    let (mut verified, mut in_doubt) = (0, 0);
    let mut conn = daemon.connect();
    for (token, state) in &known {
        let code = match state {
            Known::Created(code) | Known::VerifyInDoubt(code) | Known::Verified(code) => code,
        };
        let answer = conn.call(json!({"op": "verify", "token": token, "code": code}));
        let status = answer["status"].as_u64().unwrap_or(0);
        let fine = match state {
            Known::Created(_) => status == 200,
            Known::VerifyInDoubt(_) => status == 200 || status == 409,
            Known::Verified(_) => status == 409,
        };
        if !fine {
            shared.violation(format!("after the crashes, {token} ({state:?}): {answer}"));
        }
        verified += usize::from(matches!(state, Known::Verified(_)));
        in_doubt += usize::from(matches!(state, Known::VerifyInDoubt(_)));
    }
    let violations = shared.violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{} violations, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert!(
        known.len() > CYCLES * CLIENTS && verified > 0,
        "too little work to prove anything: {} creates, {verified} verified",
        known.len()
    );
    eprintln!(
        "{engine:?}: {CYCLES} SIGKILL cycles: {} acknowledged creates checked ({verified} verified before, {in_doubt} in doubt)",
        known.len()
    );
}

/// A tmpfs of [`SMALL_DISK`] mounted on `path` until dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

const SMALL_DISK: &str = "size=16m";

impl SmallDisk {
    fn mount(path: &std::path::Path) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", SMALL_DISK, "tmpfs"])
            .arg(path)
            .status()
            .expect("mount (util-linux)");
        assert!(mounted.success(), "mount a tmpfs on {}", path.display());
        SmallDisk {
            path: path.to_owned(),
        }
    }

    /// Takes all but `spare` bytes of what is free, in a file of its own.
    fn fill(&self, spare: u64) -> std::path::PathBuf {
        let stat = nix::sys::statvfs::statvfs(&self.path).unwrap();
        let free = stat.blocks_available() * stat.fragment_size();
        let filler = self.path.join("filler");
        let file = std::fs::File::create(&filler).unwrap();
        // Written, not just sized: tmpfs takes the space of a sparse file only as it
        // is written.
        std::io::Write::write_all(
            &mut std::io::BufWriter::new(file),
            &vec![0; free.saturating_sub(spare) as usize],
        )
        .unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.path)
            .status();
    }
}

/// A full disk: the daemon stops by itself, saying why, rather than answer 500 for
/// good; once there is room again, a restart verifies every code it acknowledged and
/// answers 409 for every verify it acknowledged. Mounting the small disk takes root
/// (CI runs as root); elsewhere this says so and checks nothing.
fn a_full_disk_stops_the_daemon_and_loses_nothing_acknowledged(engine: Engine) {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: mounting a small disk needs root");
        return;
    }
    let mut daemon = common::Daemon::prepare(&engine.store_toml(), "", "");
    // The store lives in `db` under the daemon's directory.
    let disk = SmallDisk::mount(&daemon.dir.path().join("db"));
    daemon.spawn();
    let filler = disk.fill(256 * 1024);
    let mut conn = daemon.connect();
    let mut acknowledged = Vec::new();
    let mut last = serde_json::Value::Null;
    // Bounded, to fail rather than loop for good if the disk never fills.
    for i in 0..100_000 {
        let token = format!("full-{i}");
        let create = json!({"op": "create", "token": token, "to": {"sms": format!("+1555{i:07}")}});
        let Some(answer) = conn.try_call(&create) else {
            break; // the daemon closed the connection: it is stopping
        };
        last = answer.clone();
        if answer["status"] != 201 {
            continue;
        }
        let code = daemon.code_for(&token);
        // Every other code is verified: one acknowledged must answer 409 after the
        // restart; one the daemon did not acknowledge (500, or no answer as it stops)
        // may have been written all the same, so it may answer either.
        let expected: &[u64] = if i % 2 == 1 {
            &[200]
        } else {
            match conn.try_call(&json!({"op": "verify", "token": token, "code": code})) {
                Some(answer) if answer["status"] == 200 => &[409],
                _ => &[200, 409],
            }
        };
        acknowledged.push((token, code, expected));
    }
    let status = daemon.wait_exit();
    let log = daemon.stderr();
    assert!(!status.success(), "{status}; last answer {last}\n{log}");
    assert!(log.contains("the store can no longer write"), "{log}");
    assert!(
        acknowledged.len() > 10,
        "only {} creates",
        acknowledged.len()
    );

    std::fs::remove_file(filler).unwrap();
    daemon.spawn();
    let mut conn = daemon.connect();
    for (token, code, expected) in &acknowledged {
        let answer = conn.call(json!({"op": "verify", "token": token, "code": code}));
        let status = answer["status"].as_u64().unwrap();
        assert!(expected.contains(&status), "{token}: {answer}");
    }
    daemon.stop();
    eprintln!(
        "{engine:?}: {} creates acknowledged before the disk filled, all there after",
        acknowledged.len()
    );
}

per_engine!([sled, fjall] {
    acknowledged_work_survives_sigkill,
    a_full_disk_stops_the_daemon_and_loses_nothing_acknowledged,
});
