//! `ferrymesh-proxy init-iptables`: the pod's nat rules that send its TCP traffic through the
//! proxy (API.md 2.c). The rules are applied atomically: the current nat table is read with
//! `iptables-save`, every Ferrymesh chain and jump is taken out, ours are added, and the whole
//! table goes back with one `iptables-restore`. Running it twice leaves one set of rules;
//! `--cleanup` is the same without adding ours. IPv4 and IPv6 get the same rules.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
pub use ferrymesh_proto::ports::{Ports, Subnet, parse_ports, parse_subnets};

/// Chain names; every line that names one is ours.
const INBOUND_CHAIN: &str = "FERRYMESH_INBOUND";
const OUTPUT_CHAIN: &str = "FERRYMESH_OUTPUT";
const PREFIX: &str = "FERRYMESH_";
/// `-m multiport` takes at most 15 ports (a range counts as two).
const MULTIPORT_MAX: usize = 15;

/// Which iptables the rules go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-restore`, whichever the distribution links.
    Auto,
    /// `iptables-nft-restore` (nf_tables kernel API).
    Nft,
    /// `iptables-legacy-restore` (x_tables).
    Legacy,
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    fn tool(self, backend: Backend, verb: &str) -> String {
        let base = match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match backend {
            Backend::Auto => format!("{base}-{verb}"),
            Backend::Nft => format!("{base}-nft-{verb}"),
            Backend::Legacy => format!("{base}-legacy-{verb}"),
        }
    }
}

/// What `init-iptables` installs.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Where inbound connections are redirected (the proxy's inbound listener).
    pub inbound_port: u16,
    /// Where outbound connections are redirected (the proxy's transparent listener).
    pub outbound_port: u16,
    /// The proxy's UID: its own connections are never redirected.
    pub proxy_uid: u32,
    /// Inbound ports that reach the app directly.
    pub skip_inbound_ports: Vec<Ports>,
    /// Outbound ports that bypass the proxy.
    pub skip_outbound_ports: Vec<Ports>,
    /// Outbound destinations that bypass the proxy.
    pub skip_subnets: Vec<Subnet>,
}

fn multiport(out: &mut String, chain: &str, ports: &[Ports]) {
    let mut chunk: Vec<String> = Vec::new();
    let mut weight = 0;
    let flush = |chunk: &mut Vec<String>, out: &mut String| {
        if !chunk.is_empty() {
            let _ = writeln!(
                out,
                "-A {chain} -p tcp -m multiport --dports {} -j RETURN",
                chunk.join(",")
            );
            chunk.clear();
        }
    };
    for p in ports {
        if weight + p.weight() > MULTIPORT_MAX {
            flush(&mut chunk, out);
            weight = 0;
        }
        chunk.push(p.render());
        weight += p.weight();
    }
    flush(&mut chunk, out);
}

impl Rules {
    /// Our chains (`:NAME - [0:0]` lines) and rules (`-A ...` lines) for one family.
    pub fn render(&self, family: Family) -> (String, String) {
        let chains = format!(":{INBOUND_CHAIN} - [0:0]\n:{OUTPUT_CHAIN} - [0:0]\n");
        let mut r = String::new();
        let _ = writeln!(
            r,
            "-A PREROUTING -p tcp -m comment --comment \"ferrymesh/inbound\" -j {INBOUND_CHAIN}"
        );
        multiport(&mut r, INBOUND_CHAIN, &self.skip_inbound_ports);
        let _ = writeln!(
            r,
            "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        let _ = writeln!(
            r,
            "-A OUTPUT -p tcp -m comment --comment \"ferrymesh/outbound\" -j {OUTPUT_CHAIN}"
        );
        let _ = writeln!(
            r,
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        let _ = writeln!(r, "-A {OUTPUT_CHAIN} -o lo -j RETURN");
        multiport(&mut r, OUTPUT_CHAIN, &self.skip_outbound_ports);
        for Subnet(addr, len) in &self.skip_subnets {
            if addr.is_ipv4() == (family == Family::V4) {
                let _ = writeln!(r, "-A {OUTPUT_CHAIN} -d {addr}/{len} -j RETURN");
            }
        }
        let _ = writeln!(
            r,
            "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        (chains, r)
    }
}

/// The nat table of `saved` (an `iptables-save` dump, possibly without a nat table) with every
/// Ferrymesh chain and jump taken out and `ours` (chains, rules) added.
pub fn merge(saved: &str, ours: Option<&(String, String)>) -> String {
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    let mut in_nat = false;
    for line in saved.lines() {
        let line = line.trim_end();
        if line.starts_with('*') {
            in_nat = line == "*nat";
            continue;
        }
        if !in_nat || line == "COMMIT" || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains(PREFIX) {
            continue;
        }
        if line.starts_with(':') {
            chains.push(line.to_owned());
        } else {
            rules.push(line.to_owned());
        }
    }
    if chains.is_empty() {
        for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            chains.push(format!(":{builtin} ACCEPT [0:0]"));
        }
    }
    let mut out = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(out, "{c}");
    }
    if let Some((c, _)) = ours {
        out.push_str(c);
    }
    for r in &rules {
        let _ = writeln!(out, "{r}");
    }
    if let Some((_, r)) = ours {
        out.push_str(r);
    }
    out.push_str("COMMIT\n");
    out
}

fn run(tool: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} (is iptables installed?)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the kernel has IPv6 (ip6tables is skipped when it has not).
fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Installs `rules` (or, with `None`, removes ours) for IPv4 and, where the kernel has it,
/// IPv6. With `dry_run`, prints what would be restored instead.
///
/// # Errors
/// iptables cannot be run or refuses the rules; the message carries its stderr.
pub fn apply(rules: Option<&Rules>, backend: Backend, dry_run: bool) -> anyhow::Result<()> {
    let mut families = vec![Family::V4];
    if ipv6_enabled() {
        families.push(Family::V6);
    } else {
        tracing::info!("the kernel has no IPv6; ip6tables skipped");
    }
    for family in families {
        let ours = rules.map(|r| r.render(family));
        let saved = if dry_run {
            String::new()
        } else {
            run(&family.tool(backend, "save"), &["-t", "nat"], None)?
        };
        let table = merge(&saved, ours.as_ref());
        if dry_run {
            println!("# {}\n{table}", family.tool(backend, "restore"));
            continue;
        }
        run(&family.tool(backend, "restore"), &[], Some(&table))?;
        tracing::info!(
            family = ?family,
            action = if rules.is_some() { "installed" } else { "removed" },
            "ferrymesh nat rules"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            inbound_port: 4343,
            outbound_port: 4340,
            proxy_uid: 2340,
            skip_inbound_ports: parse_ports("4390,4391").unwrap(),
            skip_outbound_ports: parse_ports("").unwrap(),
            skip_subnets: parse_subnets("10.0.0.0/8,fd00::/8").unwrap(),
        }
    }

    #[test]
    fn renders_the_rules_of_api_md() {
        let (chains, r) = rules().render(Family::V4);
        assert_eq!(
            chains,
            ":FERRYMESH_INBOUND - [0:0]\n:FERRYMESH_OUTPUT - [0:0]\n"
        );
        let expected = "\
-A PREROUTING -p tcp -m comment --comment \"ferrymesh/inbound\" -j FERRYMESH_INBOUND
-A FERRYMESH_INBOUND -p tcp -m multiport --dports 4390,4391 -j RETURN
-A FERRYMESH_INBOUND -p tcp -j REDIRECT --to-ports 4343
-A OUTPUT -p tcp -m comment --comment \"ferrymesh/outbound\" -j FERRYMESH_OUTPUT
-A FERRYMESH_OUTPUT -m owner --uid-owner 2340 -j RETURN
-A FERRYMESH_OUTPUT -o lo -j RETURN
-A FERRYMESH_OUTPUT -d 10.0.0.0/8 -j RETURN
-A FERRYMESH_OUTPUT -p tcp -j REDIRECT --to-ports 4340
";
        assert_eq!(r, expected);
        // The IPv6 table gets the IPv6 subnet only.
        let (_, r6) = rules().render(Family::V6);
        assert!(r6.contains("-d fd00::/8 -j RETURN") && !r6.contains("10.0.0.0"));
    }

    #[test]
    fn multiport_lists_are_chunked_at_15_ports() {
        let mut r = rules();
        r.skip_outbound_ports = parse_ports("1,2,3,4,5,6,7,8,9,10,11,12,13,14,100-200,15").unwrap();
        let (_, text) = r.render(Family::V4);
        let lists: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A FERRYMESH_OUTPUT -p tcp -m multiport"))
            .collect();
        assert_eq!(lists.len(), 2, "{text}");
        assert!(lists[0].contains("--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14 "));
        assert!(lists[1].contains("--dports 100:200,15 "));
    }

    #[test]
    fn bad_ports_and_subnets_are_refused() {
        assert!(parse_ports("80,x").is_err());
        assert!(parse_ports("90-80").is_err());
        assert!(parse_ports("0").is_err());
        assert!(parse_subnets("10.0.0.0/33").is_err());
        assert!(parse_subnets("fd00::/129").is_err());
        assert_eq!(
            parse_subnets("192.168.1.1").unwrap(),
            vec![Subnet("192.168.1.1".parse().unwrap(), 32)]
        );
    }

    #[test]
    fn merging_replaces_our_rules_and_keeps_everyone_elses() {
        let ours = rules().render(Family::V4);
        let first = merge("", Some(&ours));
        assert!(first.starts_with("*nat\n:PREROUTING ACCEPT [0:0]\n"));
        // A dump as iptables-save prints it, with someone else's rule and ours already in.
        let saved = format!(
            "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n{}# Completed\n",
            first.replace("COMMIT\n", "-A POSTROUTING -j MASQUERADE\nCOMMIT\n")
        );
        let second = merge(&saved, Some(&ours));
        assert_eq!(
            second.matches("-j FERRYMESH_INBOUND").count(),
            1,
            "{second}"
        );
        assert_eq!(second.matches(":FERRYMESH_OUTPUT").count(), 1);
        assert!(second.contains("-A POSTROUTING -j MASQUERADE"));
        assert!(
            !second.contains("-A INPUT -j DROP"),
            "only the nat table is restored"
        );
        let cleaned = merge(&second, None);
        assert!(!cleaned.contains("FERRYMESH"), "{cleaned}");
        assert!(cleaned.contains("-A POSTROUTING -j MASQUERADE"));
    }
}
