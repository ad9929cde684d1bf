//! `dqkd psk` end to end: two network namespaces joined by a veth pair, a userspace
//! WireGuard tunnel (`wireguard-go` + `wg`) between them, a two-site cluster on loopback
//! and one `dqkd psk` process per end. Pings flow through the tunnel while the preshared key rotates;
//! both ends show the same, new key after each rotation; a wrong key at one end stops the
//! pings, so the key is proven to be in use.
//!
//! Needs root (namespaces), `/dev/net/tun`, `ip`, `ping`, `wg` and `wireguard-go`; skips
//! loudly without them, and fails instead when `DQKD_TEST_REQUIRE` is set.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{dqkd, BIN};

/// Seconds between rotations in this test.
const INTERVAL: u64 = 6;

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The namespaces, interfaces and processes of one test run, removed on drop (also when
/// the test fails).
#[derive(Default)]
struct Lab {
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// wireguard-go's control sockets, which a killed process leaves behind.
    sockets: Vec<PathBuf>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The `dqkd psk` processes and wireguard-go first (their interfaces and sockets go with them), then
        // the namespaces (the veth pair goes with them).
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Why this machine cannot run the test, if it cannot.
fn missing_tools() -> Option<String> {
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    for (tool, arg) in [
        ("ip", "-V"),
        ("ping", "-V"),
        ("wg", "--version"),
        ("wireguard-go", "--version"),
    ] {
        if Command::new(tool).arg(arg).output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("dqkdprobe{}", std::process::id());
    if let Err(e) = run("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e}"));
    }
    let _ = run("ip", &["netns", "del", &probe]);
    None
}

/// True when the test may run; a loud skip (or, under `DQKD_TEST_REQUIRE`, a failure)
/// otherwise.
fn can_run() -> bool {
    let Some(why) = missing_tools() else {
        return true;
    };
    let required = std::env::var("DQKD_TEST_REQUIRE").is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "DQKD_TEST_REQUIRE is set but {why}: the WireGuard test must run here"
    );
    // Straight to the terminal: the test harness captures eprintln! of passing tests.
    let notice = format!("!!! SKIPPED: {why}; dqkd psk over WireGuard NOT tested !!!");
    match std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        Ok(mut stderr) => {
            let _ = std::io::Write::write_all(&mut stderr, format!("{notice}\n").as_bytes());
        }
        Err(_) => eprintln!("{notice}"),
    }
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One end: its namespace, tunnel interface and WireGuard key pair.
struct End {
    ns: String,
    iface: String,
    public: String,
    veth_ip: &'static str,
    tunnel_ip: &'static str,
}

impl End {
    fn wg(&self, args: &[&str]) -> String {
        let mut all = vec![args[0], &self.iface];
        all.extend_from_slice(&args[1..]);
        must("wg", &all)
    }

    /// The preshared key this end has for its one peer.
    fn psk(&self) -> String {
        let out = self.wg(&["show", "preshared-keys"]);
        out.split_whitespace().nth(1).unwrap_or("").to_owned()
    }

    /// Whether a ping to `other` through the tunnel gets an answer within `within`.
    fn pings(&self, other: &End, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let ok = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.ns,
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    other.tunnel_ip,
                ],
            )
            .is_ok();
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Forgets the peer's handshake state and sets the peer up again with `psk` (a file), so that
    /// the next packet needs a fresh handshake, which only succeeds with matching keys.
    fn rehandshake(&self, other: &End, psk: &Path) {
        let peer = other.public.as_str();
        self.wg(&["set", "peer", peer, "remove"]);
        let endpoint = format!("{}:51820", other.veth_ip);
        let allowed = format!("{}/32", other.tunnel_ip);
        self.wg(&[
            "set",
            "peer",
            peer,
            "preshared-key",
            psk.to_str().expect("utf-8"),
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ]);
    }
}

fn write_secret(path: &Path, text: &str) -> PathBuf {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("secret file");
    writeln!(file, "{text}").expect("write secret");
    path.to_owned()
}

/// Two namespaces, a veth pair, and a WireGuard tunnel between them with no preshared key.
fn tunnel(lab: &mut Lab, dir: &Path) -> (End, End) {
    let tag = std::process::id() % 100_000;
    let a_ns = format!("dqkdpsk{tag}a");
    let b_ns = format!("dqkdpsk{tag}b");
    for ns in [&a_ns, &b_ns] {
        must("ip", &["netns", "add", ns]);
        lab.namespaces.push(ns.clone());
        must("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }
    must(
        "ip",
        &[
            "link", "add", "veth0", "netns", &a_ns, "type", "veth", "peer", "name", "veth0",
            "netns", &b_ns,
        ],
    );
    let mut ends = Vec::new();
    for (ns, name, veth_ip, tunnel_ip) in [
        (&a_ns, "a", "10.231.0.1", "10.232.0.1"),
        (&b_ns, "b", "10.231.0.2", "10.232.0.2"),
    ] {
        must(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{veth_ip}/24"),
                "dev",
                "veth0",
            ],
        );
        must("ip", &["-n", ns, "link", "set", "veth0", "up"]);
        // Interface names are global to wireguard-go's control sockets: unique per run.
        let iface = format!("dqkwg{tag}{name}");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", &iface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wireguard-go");
        lab.children.push(child);
        let socket = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        lab.sockets.push(socket.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go made no {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let private = must("wg", &["genkey"]).trim().to_owned();
        let key_file = write_secret(&dir.join(format!("wg-{name}.key")), &private);
        let public = Command::new("wg")
            .arg("pubkey")
            .stdin(std::fs::File::open(&key_file).expect("key file"))
            .output()
            .expect("wg pubkey");
        let public = String::from_utf8_lossy(&public.stdout).trim().to_owned();
        must(
            "wg",
            &[
                "set",
                &iface,
                "private-key",
                key_file.to_str().expect("utf-8"),
                "listen-port",
                "51820",
            ],
        );
        must(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{tunnel_ip}/24"),
                "dev",
                &iface,
            ],
        );
        must("ip", &["-n", ns, "link", "set", &iface, "up"]);
        ends.push(End {
            ns: ns.clone(),
            iface,
            public,
            veth_ip,
            tunnel_ip,
        });
    }
    let b = ends.pop().expect("b");
    let a = ends.pop().expect("a");
    for (this, other) in [(&a, &b), (&b, &a)] {
        let endpoint = format!("{}:51820", other.veth_ip);
        let allowed = format!("{}/32", other.tunnel_ip);
        this.wg(&[
            "set",
            "peer",
            &other.public,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ]);
    }
    (a, b)
}

/// Starts one `dqkd psk` process; its log goes to `<dir>/<name>.log`.
fn rotator(lab: &mut Lab, cluster: &Cluster, name: &str, args: &[String]) {
    let d = cluster.dir.path();
    let log = std::fs::File::create(d.join(format!("{name}.log"))).expect("log");
    let child = Command::new(BIN)
        .arg("psk")
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start dqkd psk");
    lab.children.push(child);
}

fn logs(cluster: &Cluster) -> String {
    let d = cluster.dir.path();
    ["initiator", "responder"]
        .iter()
        .map(|n| {
            format!(
                "--- {n}\n{}",
                std::fs::read_to_string(d.join(format!("{n}.log"))).unwrap_or_default()
            )
        })
        .collect()
}

fn metrics(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text
}

/// Polls until both ends show the same preshared key other than `old`; returns it.
fn next_key(a: &End, b: &End, old: &str, cluster: &Cluster) -> String {
    let deadline = Instant::now() + Duration::from_secs(4 * INTERVAL);
    loop {
        let (ka, kb) = (a.psk(), b.psk());
        if ka == kb && ka != old && ka != "(none)" && !ka.is_empty() {
            return ka;
        }
        assert!(
            Instant::now() < deadline,
            "no common new key (a: {ka}, b: {kb}, old: {old})\n{}",
            logs(cluster)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn preshared_keys_rotate_in_step_and_a_wrong_one_stops_the_tunnel() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::default();
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b) = tunnel(&mut lab, work.path());
    assert!(
        a.pings(&b, Duration::from_secs(10)),
        "the tunnel works before any PSK"
    );

    let cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 2000);
    let d = cluster.dir.path();
    let pki = d.join("pki");
    let pki_s = pki.to_str().expect("utf-8");
    // The responder serves its end of the link on loopback with bob's certificate.
    dqkd(&[
        "pki",
        "issue",
        "sae",
        "bob",
        "--ca",
        pki_s,
        "--ip",
        "127.0.0.1",
        "--force",
    ]);
    let (listen, metrics_port) = (free_port(), free_port());
    let common = |sae: &str, peer: &str, kme: &str, end: &End, other: &End| -> Vec<String> {
        [
            "--cluster",
            "test",
            "--sae",
            sae,
            "--peer-sae",
            peer,
            "--kme",
            &format!("https://{}", cluster.sites[kme].addr),
            "--ca",
            &format!("{pki_s}/ca.pem"),
            "--cert",
            &format!("{pki_s}/sae/{sae}.pem"),
            "--key",
            &format!("{pki_s}/sae/{sae}.key"),
            "--crl",
            &format!("{pki_s}/ca.crl.pem"),
            "--interval",
            &INTERVAL.to_string(),
            "--max-skew",
            "1",
            "--wg-iface",
            &end.iface,
            "--wg-peer",
            &other.public,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut responder = common("bob", "alice", "KME_B", &b, &a);
    responder.extend([
        "--role".into(),
        "responder".into(),
        "--listen".into(),
        format!("127.0.0.1:{listen}"),
    ]);
    rotator(&mut lab, &cluster, "responder", &responder);
    let mut initiator = common("alice", "bob", "KME_A", &a, &b);
    initiator.extend([
        "--role".into(),
        "initiator".into(),
        "--peer".into(),
        format!("https://127.0.0.1:{listen}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    rotator(&mut lab, &cluster, "initiator", &initiator);

    let mut seen = vec![next_key(&a, &b, "(none)", &cluster)];
    for rotation in 1..=3 {
        let key = next_key(&a, &b, seen.last().expect("a key"), &cluster);
        assert!(
            !seen.contains(&key),
            "rotation {rotation} brought a key used before"
        );
        // A fresh handshake with the new key: the tunnel carries traffic with it.
        let file = write_secret(&work.path().join("current.psk"), &key);
        a.rehandshake(&b, &file);
        assert!(
            a.pings(&b, Duration::from_secs(10)),
            "no ping through the tunnel after rotation {rotation}\n{}",
            logs(&cluster)
        );
        seen.push(key);
    }
    let text = metrics(&format!("127.0.0.1:{metrics_port}"));
    let rotations: f64 = text
        .lines()
        .find(|l| l.starts_with("dqkd_psk_rotations_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(rotations >= 4.0, "rotations counted: {text}");
    for key in &seen {
        assert!(
            !logs(&cluster).contains(key.as_str()),
            "a key appeared in a log"
        );
    }

    // Both ends stop (the keys stay in use); a wrong key at one end stops the pings.
    for child in lab.children.iter_mut().skip(2) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let wrong = write_secret(
        &work.path().join("wrong.psk"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    a.rehandshake(&b, &wrong);
    assert!(
        !a.pings(&b, Duration::from_secs(6)),
        "pings passed with a wrong preshared key"
    );
    // …and the right one brings them back: it was the key, not a broken tunnel.
    let right = write_secret(&work.path().join("right.psk"), &b.psk());
    a.rehandshake(&b, &right);
    assert!(
        a.pings(&b, Duration::from_secs(10)),
        "no ping with the right key again"
    );
}
