//! "Pods" in network namespaces (DESIGN.md, the second way to run): each pod is a network
//! namespace with a veth pair onto a bridge the test made, its own loopback and a default route
//! through the bridge. Processes run inside with `ip netns exec`; the proxy runs as its own
//! UID (2340) so that the pod's iptables rules can tell its connections apart.
//!
//! These tests need root. Without it they skip and say why; under CI (`CI` set) a missing
//! privilege or tool fails the test instead, so they are never skipped silently there.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The proxy's UID in a pod (API.md 2.c).
pub const PROXY_UID: u32 = 2340;

/// What a pod test needs: root, `ip`, `iptables-restore`, `setpriv` and `curl`. `Err` says what
/// is missing.
fn missing() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("cannot run id: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("needs root (network namespaces and iptables)".into());
    }
    for tool in ["ip", "iptables-restore", "iptables-save", "setpriv", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!(
                "{tool} is not installed (make test installs it: scripts/test-deps.sh)"
            ));
        }
    }
    Ok(())
}

/// Runs `program args`, panicking with its stderr when it fails.
///
/// # Panics
/// When the command fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bridge and the pods on it; everything is deleted on drop.
#[derive(Debug)]
pub struct Network {
    /// The bridge's name.
    pub bridge: String,
    /// The bridge's address in the root namespace (the pods' gateway), `10.a.b.1`.
    pub gateway: Ipv4Addr,
    /// Its IPv6 address, `fd00:a:b::1`.
    pub gateway_v6: Ipv6Addr,
    tag: String,
    next: u8,
    namespaces: Vec<String>,
    /// A folder every pod's processes (the proxy's UID too) can read.
    pub dir: tempfile::TempDir,
}

/// One pod: its namespace and address.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Its name in the test.
    pub name: String,
    /// The network namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the bridge.
    pub ip_v6: Ipv6Addr,
}

impl Network {
    /// Makes a bridge on a /24 of its own, or returns `None` (after saying why) when this
    /// machine cannot run pod tests and this is not CI.
    ///
    /// # Panics
    /// Under CI when a privilege or tool is missing, or when setting up fails.
    pub fn create(test: &str) -> Option<Network> {
        if let Err(why) = missing() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: network-namespace pods cannot run here: {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let a = u8::try_from(200 + pid % 50).expect("below 256");
        let b = u8::try_from((pid / 50) % 250).expect("below 256");
        let bridge = format!("fmbr{tag}");
        let gateway = Ipv4Addr::new(10, a, b, 1);
        let gateway_v6 = Ipv6Addr::new(0xfd00, a.into(), b.into(), 0, 0, 0, 0, 1);
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        sh("ip", &["link", "add", &bridge, "type", "bridge"]);
        sh(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &bridge],
        );
        let v6 = format!("{gateway_v6}/64");
        sh("ip", &["-6", "addr", "add", &v6, "dev", &bridge, "nodad"]);
        sh("ip", &["link", "set", &bridge, "up"]);
        forward_within(&bridge, "-I");
        let dir = tempfile::tempdir().expect("a temporary folder");
        open_up(dir.path());
        Some(Network {
            bridge,
            gateway,
            gateway_v6,
            tag,
            next: 10,
            namespaces: Vec::new(),
            dir,
        })
    }

    /// Adds a pod: a namespace, a veth pair onto the bridge, loopback up, a default route.
    ///
    /// # Panics
    /// When a step fails.
    pub fn pod(&mut self, name: &str) -> Pod {
        self.next += 1;
        let ns = format!("fm{}-{name}", self.tag);
        let host_end = format!("fmv{}{}", self.tag, self.next);
        let ip = Ipv4Addr::from(u32::from(self.gateway) - 1 + u32::from(self.next));
        let ip_v6 = Ipv6Addr::from(u128::from(self.gateway_v6) - 1 + u128::from(self.next));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh("ip", &["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        sh(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        sh("ip", &["link", "set", &host_end, "master", &self.bridge]);
        sh("ip", &["link", "set", &host_end, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["route", "add", "default", "via", &self.gateway.to_string()]);
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{ip_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        inside(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.gateway_v6.to_string(),
        ]);
        Pod {
            name: name.to_owned(),
            ns,
            ip,
            ip_v6,
        }
    }

    /// A command run inside `pod` as root.
    pub fn exec(pod: &Pod, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.ns]).arg(program);
        cmd
    }

    /// A command run inside `pod` as the proxy's UID and GID.
    pub fn exec_as_proxy(pod: &Pod, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        let id = PROXY_UID.to_string();
        cmd.args([
            "netns", "exec", &pod.ns, "setpriv", "--reuid", &id, "--regid", &id,
        ])
        .arg("--clear-groups")
        .arg(program);
        cmd
    }

    /// `program` where the proxy's UID can run it: the build folder may sit under a folder
    /// only root can enter, so the binary is linked (or copied) into this network's folder.
    ///
    /// # Panics
    /// When it can be neither linked nor copied.
    pub fn reachable_bin(&self, program: &Path) -> PathBuf {
        let name = program.file_name().expect("a binary has a name");
        let to = self.dir.path().join(name);
        if !to.exists() && std::fs::hard_link(program, &to).is_err() {
            std::fs::copy(program, &to).expect("copying a binary");
        }
        to
    }

    /// Runs `curl` inside `pod` (as root, so its connections are intercepted) and returns
    /// the status code and body.
    ///
    /// # Panics
    /// When curl cannot be run.
    pub fn curl(pod: &Pod, url: &str) -> (u16, String) {
        let out = Self::exec(pod, Path::new("curl"))
            .args([
                "-gsS",
                "--noproxy",
                "*",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                url,
            ])
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }
}

/// Lets the proxy's UID into `dir` (a temporary folder is 0700).
///
/// # Panics
/// When the mode cannot be set.
pub fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .expect("opening a folder to the proxy's UID");
}

/// Lets traffic between the bridge's own ports through the root namespace's FORWARD chain
/// (`-I`), or takes that rule out again (`-D`). With `br_netfilter` loaded (Docker loads it)
/// bridged frames pass through iptables, and Docker sets the FORWARD policy to DROP: pod to pod
/// traffic on our bridge would be dropped. Only our bridge's traffic is allowed, first in the
/// chain; nothing else of the host's rules changes.
fn forward_within(bridge: &str, op: &str) {
    for program in ["iptables", "ip6tables"] {
        let _ = Command::new(program)
            .args([
                "-w", op, "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT",
            ])
            .output();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        forward_within(&self.bridge, "-D");
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
