//! The packaged files agree with the code: the example config lists every key with
//! its default, the units point where the package installs things, and README.md's
//! sessions work as written.

use std::collections::BTreeMap;

use otpd::config::Config;

const EXAMPLE_CONFIG: &str = include_str!("../packaging/otpd.toml");
const SERVICE: &str = include_str!("../systemd/otpd.service");
const SOCKET: &str = include_str!("../systemd/otpd.socket");
const SYSUSERS: &str = include_str!("../systemd/otpd.sysusers");
const MANIFEST: &str = include_str!("../Cargo.toml");
const README: &str = include_str!("../README.md");

/// Every leaf of `value` by its dotted key (`otp.ttl_secs`).
fn leaves(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(&key, value, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.clone());
        }
    }
}

fn flatten(value: &toml::Value) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    leaves("", value, &mut out);
    out
}

#[test]
fn example_config_lists_every_key_with_its_default() {
    Config::parse(EXAMPLE_CONFIG).expect("packaging/otpd.toml is a valid config");
    let example = flatten(&toml::from_str(EXAMPLE_CONFIG).unwrap());
    let defaults = flatten(&toml::Value::try_from(Config::default()).unwrap());
    let mut drift = Vec::new();
    for (key, default) in &defaults {
        match example.get(key) {
            None => drift.push(format!("{key} is missing (default {default})")),
            Some(value) if value != default => {
                drift.push(format!("{key} = {value}, but the default is {default}"))
            }
            Some(_) => {}
        }
    }
    drift.extend(
        example
            .keys()
            .filter(|key| !defaults.contains_key(*key))
            .map(|key| format!("{key} is not a config key")),
    );
    assert!(
        drift.is_empty(),
        "packaging/otpd.toml drifted from src/config.rs:\n{}",
        drift.join("\n")
    );
}

/// The value of the first `key=` line of a unit file.
fn directive<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

#[test]
fn units_point_where_the_package_installs() {
    let exec = directive(SERVICE, "ExecStart");
    assert_eq!(exec, "/usr/bin/otpd serve --config /etc/otpd/otpd.toml");
    let manifest: toml::Value = toml::from_str(MANIFEST).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap();
    let installs = |source: &str, dest: &str| {
        assets
            .iter()
            .any(|asset| asset[0].as_str() == Some(source) && asset[1].as_str() == Some(dest))
    };
    assert!(installs("target/release/otpd", "usr/bin/"));
    assert!(installs("packaging/otpd.toml", "etc/otpd/otpd.toml"));
    assert!(installs("packaging/otpd.8", "usr/share/man/man8/otpd.8"));

    // The socket the client tools look for is the one otpd.socket creates, for the
    // clients' group the sysusers file creates: not the service's, which may read the
    // config.
    assert_eq!(
        directive(SOCKET, "ListenStream"),
        otpd::client::SYSTEM_SOCKET
    );
    assert_eq!(directive(SOCKET, "SocketGroup"), "otpd-clients");
    assert_eq!(directive(SERVICE, "User"), "otpd");
    assert!(SYSUSERS.lines().any(|line| line.starts_with("u otpd ")));
    assert!(
        SYSUSERS
            .lines()
            .any(|line| line.starts_with("g otpd-clients "))
    );
}

#[test]
fn the_service_never_deletes_the_activation_socket() {
    // A RuntimeDirectory= of the socket's directory would be removed, socket and all,
    // when the service stops (unless preserved); PrivateUsers= would make SO_PEERCRED
    // report every peer as 65534 and break allowed_uids.
    for line in SERVICE.lines() {
        assert!(!line.starts_with("RuntimeDirectory="), "{line}");
        assert!(!line.starts_with("PrivateUsers="), "{line}");
    }
    assert_eq!(directive(SERVICE, "Type"), "notify");
    assert_eq!(directive(SERVICE, "NotifyAccess"), "main");
    assert_eq!(directive(SERVICE, "Requires"), "otpd.socket");
}

/// README.md's sessions work when typed as written: a create piped into socat waits
/// for its answer (socat closes half a second after its input ends unless `-t` says
/// otherwise, and a create waits for its delivery), and the `otpd.log` a session reads
/// is the one the quick start writes.
#[test]
fn readme_sessions_wait_for_answers_and_read_the_log_the_quick_start_writes() {
    let piped_creates: Vec<&str> = README
        .lines()
        .filter(|line| line.contains(r#""op":"create""#) && line.contains("| socat"))
        .collect();
    assert!(!piped_creates.is_empty());
    for line in piped_creates {
        assert!(line.contains("| socat -t 30 -"), "{line}");
    }
    let reads_the_log = README
        .lines()
        .any(|line| line.starts_with("$ ") && line.contains("otpd.log") && !line.contains("serve"));
    assert!(reads_the_log);
    assert!(
        README.contains("cargo run --release -- serve 2> otpd.log &"),
        "the quick start does not write the otpd.log the socat session reads"
    );
}
