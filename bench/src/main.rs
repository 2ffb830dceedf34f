//! `make bench`: latency at a fixed arrival rate (no coordinated omission), maximum throughput,
//! CPU per request and proxy memory for: direct to an upstream; Ferrymesh 1 hop (outbound only)
//! and 2 hops (outbound + inbound); and, in the same run, 2-hop pairs of HAProxy, nginx and
//! Envoy. Prints a markdown table with ratios to direct and checks the issue's targets.
//! A benchmark, not a test: numbers depend on the machine; nothing here asserts.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ferrymesh_bench::{load, peers, procstat};
use ferrymesh_test_support::mesh::{Mesh, ProxySpec, eventually, get};
use ferrymesh_test_support::process::Spawned;

#[derive(Debug, Parser)]
#[command(name = "ferrymesh-bench")]
struct Args {
    /// Fixed arrival rate, requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds at the fixed rate.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of the max-throughput run.
    #[arg(long, default_value_t = 5)]
    max_seconds: u64,
    /// Connections of the max-throughput run.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Skip the peers (HAProxy, nginx, Envoy).
    #[arg(long)]
    no_peers: bool,
}

struct Variant {
    name: String,
    addr: SocketAddr,
    /// The proxy processes (for CPU and memory).
    pids: Vec<u32>,
    /// Proxy processes in the path (2 for a 2-hop pair).
    hops: usize,
}

struct Row {
    name: String,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    max_rps: f64,
    cpu_us: f64,
    rss_idle: f64,
    rss_loaded: f64,
}

fn pids_of(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .flat_map(|p| procstat::with_children(*p))
        .collect()
}

async fn measure(v: &Variant, args: &Args) -> anyhow::Result<Row> {
    let all = pids_of(&v.pids);
    #[allow(clippy::cast_precision_loss)] // process counts are tiny
    let per_proxy = |f: &dyn Fn(u32) -> f64| {
        if v.hops == 0 {
            0.0
        } else {
            all.iter().map(|p| f(*p)).sum::<f64>() / v.hops as f64
        }
    };
    let rss_idle = per_proxy(&procstat::rss_mib);
    // Warm up connections and caches.
    load::fixed_rate(v.addr, args.rate, Duration::from_secs(1)).await?;
    let cpu_before: f64 = all.iter().map(|p| procstat::cpu_seconds(*p)).sum();
    let fixed = load::fixed_rate(v.addr, args.rate, Duration::from_secs(args.seconds)).await?;
    let cpu_after: f64 = all.iter().map(|p| procstat::cpu_seconds(*p)).sum();
    let rss_loaded = per_proxy(&procstat::rss_mib);
    let (max_rps, max_errors) = load::max_throughput(
        v.addr,
        args.concurrency,
        Duration::from_secs(args.max_seconds),
    )
    .await?;
    #[allow(clippy::cast_precision_loss)] // microsecond latencies are far below 2^52
    let q = |p: f64| fixed.latency.value_at_quantile(p) as f64 / 1000.0;
    #[allow(clippy::cast_precision_loss)] // request counts are far below 2^52
    let cpu_us = (cpu_after - cpu_before) * 1e6 / fixed.sent as f64;
    Ok(Row {
        name: v.name.clone(),
        p50: q(0.5),
        p99: q(0.99),
        p999: q(0.999),
        errors: fixed.errors + max_errors,
        max_rps,
        cpu_us,
        rss_idle,
        rss_loaded,
    })
}

fn table(rows: &[Row], args: &Args) -> String {
    let direct = &rows[0];
    let mut out = format!(
        "Fixed rate {} rps for {}s (latency from the scheduled send time, ms); max throughput with {} connections for {}s.\n\
         CPU is the proxies' user+system time per request at the fixed rate (all hops); RSS is per proxy process.\n\n",
        args.rate, args.seconds, args.concurrency, args.max_seconds
    );
    out.push_str("| path | p50 | p99 | p99.9 | p99 added vs direct | max rps | rps vs direct | CPU µs/req | RSS idle MiB | RSS loaded MiB | errors |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.3} | {:.3} | {:.3} | {:+.3} | {:.0} | {:.2}x | {:.1} | {:.1} | {:.1} | {} |",
            r.name,
            r.p50,
            r.p99,
            r.p999,
            r.p99 - direct.p99,
            r.max_rps,
            r.max_rps / direct.max_rps,
            r.cpu_us,
            r.rss_idle,
            r.rss_loaded,
            r.errors
        );
    }
    out
}

fn verdicts(rows: &[Row]) -> String {
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    let (Some(direct), Some(fm)) = (find("direct"), find("Ferrymesh 2 hops")) else {
        return String::new();
    };
    let mut out = String::from("\nTargets (Ferrymesh 2 hops):\n");
    if let Some(full) = find("Ferrymesh 2 hops, full policy") {
        let ratio = full.cpu_us / fm.cpu_us;
        let _ = writeln!(
            out,
            "- full policy at most 1.15x the CPU per request of no policy: {} ({:.1} µs vs {:.1} µs, {ratio:.2}x)",
            if ratio <= 1.15 { "MET" } else { "MISSED" },
            full.cpu_us,
            fm.cpu_us
        );
    }
    if let Some(tls) = find("Ferrymesh 2 hops, mTLS") {
        let ratio = tls.cpu_us / fm.cpu_us;
        let _ = writeln!(
            out,
            "- mTLS at most 1.3x the CPU per request of plaintext: {} ({:.1} µs vs {:.1} µs, {ratio:.2}x)",
            if ratio <= 1.3 { "MET" } else { "MISSED" },
            tls.cpu_us,
            fm.cpu_us
        );
    }
    if let Some(h) = find("HAProxy 2 hops") {
        let (ours, theirs) = (fm.p99 - direct.p99, h.p99 - direct.p99);
        let _ = writeln!(
            out,
            "- p99 added at the fixed rate below HAProxy's: {} ({ours:.3} ms vs {theirs:.3} ms)",
            if ours < theirs { "MET" } else { "MISSED" }
        );
        let _ = writeln!(
            out,
            "- CPU per request at or below HAProxy's: {} ({:.1} µs vs {:.1} µs)",
            if fm.cpu_us <= h.cpu_us {
                "MET"
            } else {
                "MISSED"
            },
            fm.cpu_us,
            h.cpu_us
        );
    }
    let _ = writeln!(
        out,
        "- idle RSS at most 10 MiB per proxy: {} ({:.1} MiB)",
        if fm.rss_idle <= 10.0 { "MET" } else { "MISSED" },
        fm.rss_idle
    );
    out
}

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: bench-meshed, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
                        apiVersion: v1\nkind: Service\nmetadata: {name: bench-policy, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

/// Every section the proxy enforces, none of which trips on a healthy upstream (the upstream's
/// answers carry no freshness, so the cache stores nothing and every request passes through
/// it): the cost of the stack itself (issue 3's target: at most 1.15x the CPU of no policy).
const FULL_POLICY: &str = r#"
apiVersion: policy.ferrymesh.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: bench-policy, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: bench-policy}]
  timeouts: {request: 5s, perTry: 2s}
  retry: {attempts: 2, retryOn: [5xx, connect-failure, reset]}
  circuitBreaker: {tripWhen: {consecutiveFailures: 50}}
  outlierDetection: {consecutiveErrors: 50}
  healthCheck: {http: {path: /ping}, interval: 1s}
  fallback: {triggers: [circuit-open], staticResponse: {status: 503}}
  cache: {maxEntries: 100}
  loadBalancer: {algorithm: PeakEWMA}
"#;

fn direct_service(upstream: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bench-direct, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: bench-direct, namespace: shop, labels: {{kubernetes.io/service-name: bench-direct}}}}\n\
         ports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n",
        upstream.port(),
        upstream.ip()
    )
}

/// The 2-hop pair with mTLS: a mesh with the controller as CA, a server and a client proxy.
async fn secure_pair(upstream: SocketAddr) -> anyhow::Result<(Mesh, [Spawned; 2], Variant)> {
    let secure = Mesh::start_secure(&[("services.yaml", SERVICES)], &[]);
    let server = secure.proxy(&ProxySpec {
        log: Some("warn".to_owned()),
        ..ProxySpec::app("bench-server", "bench-meshed", upstream)
    });
    let client = secure.proxy(&ProxySpec {
        fixed: vec!["bench-meshed.shop:80".into()],
        log: Some("warn".to_owned()),
        ..ProxySpec::client("bench-client")
    });
    let addr: SocketAddr = client.listening["fixed"][0][0]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    eventually(Duration::from_secs(10), || async move {
        get(addr, "/ping").await.is_ok_and(|(s, _)| s == 200)
    })
    .await?;
    let variant = Variant {
        name: "Ferrymesh 2 hops, mTLS".into(),
        addr,
        pids: vec![client.pid(), server.pid()],
        hops: 2,
    };
    Ok((secure, [client, server], variant))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let upstream = load::upstream().await?;
    let mut variants = vec![Variant {
        name: "direct".into(),
        addr: upstream,
        pids: vec![],
        hops: 0,
    }];

    let direct_yaml = direct_service(upstream);
    let mesh = Mesh::start(&[
        ("services.yaml", SERVICES),
        ("direct.yaml", &direct_yaml),
        ("policy.yaml", FULL_POLICY),
    ]);
    let quiet = Some("warn".to_owned());
    let server = mesh.proxy(&ProxySpec {
        log: quiet.clone(),
        ..ProxySpec::app("bench-server", "bench-meshed", upstream)
    });
    let policy_server = mesh.proxy(&ProxySpec {
        log: quiet.clone(),
        ..ProxySpec::app("bench-policy-server", "bench-policy", upstream)
    });
    let client = mesh.proxy(&ProxySpec {
        fixed: vec![
            "bench-direct.shop:80".into(),
            "bench-meshed.shop:80".into(),
            "bench-policy.shop:80".into(),
        ],
        log: quiet,
        ..ProxySpec::client("bench-client")
    });
    let fixed = |i: usize| -> anyhow::Result<SocketAddr> {
        Ok(client.listening["fixed"][i][0]
            .as_str()
            .unwrap_or_default()
            .parse()?)
    };
    let (one_hop, two_hops, with_policy) = (fixed(0)?, fixed(1)?, fixed(2)?);
    for addr in [one_hop, two_hops, with_policy] {
        eventually(Duration::from_secs(10), || async move {
            get(addr, "/ping").await.is_ok_and(|(s, _)| s == 200)
        })
        .await?;
    }
    variants.push(Variant {
        name: "Ferrymesh 1 hop".into(),
        addr: one_hop,
        pids: vec![client.pid()],
        hops: 1,
    });
    variants.push(Variant {
        name: "Ferrymesh 2 hops".into(),
        addr: two_hops,
        pids: vec![client.pid(), server.pid()],
        hops: 2,
    });
    variants.push(Variant {
        name: "Ferrymesh 2 hops, full policy".into(),
        addr: with_policy,
        pids: vec![client.pid(), policy_server.pid()],
        hops: 2,
    });

    // The same pair with mTLS between the sidecars (a mesh with the controller as CA).
    let (_secure, _tls_procs, variant) = secure_pair(upstream).await?;
    variants.push(variant);

    let dir = tempfile::tempdir()?;
    let mut peers = Vec::new();
    if !args.no_peers {
        for kind in [peers::Kind::Haproxy, peers::Kind::Nginx, peers::Kind::Envoy] {
            let (first, second) = (peers::free_port()?, peers::free_port()?);
            let inner = peers::hop(kind, dir.path(), second, upstream).await?;
            let outer = peers::hop(
                kind,
                dir.path(),
                first,
                SocketAddr::from(([127, 0, 0, 1], second)),
            )
            .await?;
            variants.push(Variant {
                name: format!("{} 2 hops", kind.name()),
                addr: SocketAddr::from(([127, 0, 0, 1], first)),
                pids: vec![outer.child.id(), inner.child.id()],
                hops: 2,
            });
            peers.push((outer, inner));
        }
    }

    let mut rows = Vec::new();
    for v in &variants {
        eprintln!("bench: {} ...", v.name);
        rows.push(measure(v, &args).await?);
    }
    println!("{}", table(&rows, &args));
    print!("{}", verdicts(&rows));
    Ok(())
}
