//! `make bench`: latency at a fixed arrival rate, maximum throughput, CPU per request and proxy
//! memory for: direct to an upstream; Ferrymesh 1 hop (outbound only) and 2 hops (outbound +
//! inbound, plaintext, with the full resilience policy, with mTLS); and, in the same run, 2-hop
//! pairs of HAProxy, nginx and Envoy. The load comes from standard tools (oha at a fixed rate
//! with latency correction, wrk at saturation: [`tools`]); every variant is measured in each of
//! several interleaved rounds and the medians reported, so a slow moment of the machine hits
//! every variant alike. Then the control plane: thousands of simulated proxies
//! ([`ferrymesh_test_support::sim`]) connect, and a policy edit is timed to each of them.
//! A benchmark, not a test: numbers depend on the machine; nothing here asserts.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ferrymesh_bench::{load, peers, procstat, tools};
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
    /// Connections of the fixed-rate run.
    #[arg(long, default_value_t = 16)]
    rate_connections: u32,
    /// Seconds of the max-throughput run.
    #[arg(long, default_value_t = 5)]
    max_seconds: u64,
    /// Connections of the max-throughput run.
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// Interleaved rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the peers (HAProxy, nginx, Envoy).
    #[arg(long)]
    no_peers: bool,
    /// Simulated proxies of the control-plane run (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    proxies: usize,
    /// Only the control-plane run.
    #[arg(long)]
    control_plane_only: bool,
}

struct Variant {
    name: String,
    addr: SocketAddr,
    /// The proxy processes (for CPU and memory).
    pids: Vec<u32>,
    /// Proxy processes in the path (2 for a 2-hop pair).
    hops: usize,
}

/// One variant's figures (medians over the rounds in the table).
#[derive(Default, Clone)]
struct Row {
    name: String,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    /// Requests answered 2xx/3xx, both runs.
    served: u64,
    max_rps: f64,
    /// Proxy CPU per request, both hops, at the fixed rate (µs).
    cpu_us: f64,
    /// The same at saturation (µs).
    cpu_sat_us: f64,
    rss_idle: f64,
    rss_loaded: f64,
}

fn pids_of(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .flat_map(|p| procstat::with_children(*p))
        .collect()
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| procstat::cpu_seconds(*p)).sum()
}

/// One round of one variant: oha at the fixed rate, then wrk at saturation.
fn measure(v: &Variant, args: &Args) -> anyhow::Result<Row> {
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
    tools::fixed_rate(
        v.addr,
        args.rate,
        Duration::from_secs(1),
        args.rate_connections,
    )?;
    let before = cpu(&all);
    let fixed = tools::fixed_rate(
        v.addr,
        args.rate,
        Duration::from_secs(args.seconds),
        args.rate_connections,
    )?;
    let cpu_fixed = cpu(&all) - before;
    let rss_loaded = per_proxy(&procstat::rss_mib);
    let before = cpu(&all);
    let sat = tools::saturate(
        v.addr,
        args.concurrency,
        Duration::from_secs(args.max_seconds),
    )?;
    let cpu_sat = cpu(&all) - before;
    #[allow(clippy::cast_precision_loss)] // request counts are far below 2^52
    let per_request = |cpu: f64, n: u64| cpu * 1e6 / n.max(1) as f64;
    Ok(Row {
        name: v.name.clone(),
        p50: fixed.p50,
        p99: fixed.p99,
        p999: fixed.p999,
        errors: fixed.errors + sat.errors,
        served: fixed.requests + sat.requests,
        max_rps: sat.rps,
        cpu_us: per_request(cpu_fixed, fixed.requests),
        cpu_sat_us: per_request(cpu_sat, sat.requests),
        rss_idle,
        rss_loaded,
    })
}

/// The medians of a variant's rounds (errors summed).
fn medians(rounds: &[Row]) -> Row {
    let m = |f: &dyn Fn(&Row) -> f64| tools::median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    Row {
        name: rounds.first().map(|r| r.name.clone()).unwrap_or_default(),
        p50: m(&|r| r.p50),
        p99: m(&|r| r.p99),
        p999: m(&|r| r.p999),
        errors: rounds.iter().map(|r| r.errors).sum(),
        served: rounds.iter().map(|r| r.served).sum(),
        max_rps: m(&|r| r.max_rps),
        cpu_us: m(&|r| r.cpu_us),
        cpu_sat_us: m(&|r| r.cpu_sat_us),
        rss_idle: m(&|r| r.rss_idle),
        rss_loaded: m(&|r| r.rss_loaded),
    }
}

fn table(rows: &[Row], args: &Args) -> String {
    let direct = &rows[0];
    let mut out = format!(
        "Medians of {} interleaved rounds. oha at {} rps for {}s on {} connections, latency corrected \
         for coordinated omission (ms); wrk with {} connections for {}s.\n\
         CPU is the proxies' user+system time per request (all hops); RSS is per proxy process.\n\n",
        args.rounds,
        args.rate,
        args.seconds,
        args.rate_connections,
        args.concurrency,
        args.max_seconds
    );
    out.push_str("| path | p50 | p99 | p99.9 | p99 added | max rps | vs direct | CPU µs/req at rate | CPU µs/req at max | RSS idle MiB | RSS loaded MiB | errors |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.3} | {:.3} | {:.3} | {:+.3} | {:.0} | {:.2}x | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.name,
            r.p50,
            r.p99,
            r.p999,
            r.p99 - direct.p99,
            r.max_rps,
            r.max_rps / direct.max_rps,
            r.cpu_us,
            r.cpu_sat_us,
            r.rss_idle,
            r.rss_loaded,
            r.errors
        );
    }
    out
}

fn verdict(out: &mut String, what: &str, met: bool, detail: &str) {
    let _ = writeln!(
        out,
        "- {what}: {} ({detail})",
        if met { "MET" } else { "MISSED" }
    );
}

fn verdicts(rows: &[Row]) -> String {
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    let (Some(direct), Some(fm)) = (find("direct"), find("Ferrymesh 2 hops")) else {
        return String::new();
    };
    let mut out = String::from("\nTargets (Ferrymesh 2 hops, plaintext):\n");
    // A row with failed requests measures failures, not proxying: no target is met on it.
    #[allow(clippy::cast_precision_loss)] // request counts are far below 2^52
    let failing: Vec<String> = rows
        .iter()
        .filter(|r| r.errors as f64 > 0.001 * (r.errors + r.served) as f64)
        .map(|r| format!("{} ({} of {})", r.name, r.errors, r.errors + r.served))
        .collect();
    verdict(
        &mut out,
        "every path answered at least 99.9% of its requests",
        failing.is_empty(),
        &if failing.is_empty() {
            "no errors beyond 0.1%".to_owned()
        } else {
            format!("errors: {}", failing.join(", "))
        },
    );
    let added = |r: &Row| r.p99 - direct.p99;
    if let Some(n) = find("nginx 2 hops") {
        verdict(
            &mut out,
            "p99 added at the fixed rate at most nginx's",
            added(fm) <= added(n),
            &format!("{:.3} ms vs {:.3} ms", added(fm), added(n)),
        );
    }
    if let Some(h) = find("HAProxy 2 hops") {
        verdict(
            &mut out,
            "CPU per request at the fixed rate at most HAProxy's",
            fm.cpu_us <= h.cpu_us,
            &format!("{:.1} µs vs {:.1} µs", fm.cpu_us, h.cpu_us),
        );
        verdict(
            &mut out,
            "CPU per request at saturation at most HAProxy's",
            fm.cpu_sat_us <= h.cpu_sat_us,
            &format!("{:.1} µs vs {:.1} µs", fm.cpu_sat_us, h.cpu_sat_us),
        );
    }
    let ratio = fm.max_rps / direct.max_rps;
    verdict(
        &mut out,
        "max throughput at least 0.30x direct",
        ratio >= 0.30,
        &format!("{ratio:.2}x"),
    );
    verdict(
        &mut out,
        "idle RSS at most 10 MiB per proxy",
        fm.rss_idle <= 10.0,
        &format!("{:.1} MiB", fm.rss_idle),
    );
    if let Some(full) = find("Ferrymesh 2 hops, full policy") {
        let ratio = full.cpu_sat_us / fm.cpu_sat_us;
        verdict(
            &mut out,
            "full policy at most 1.15x the CPU per request of no policy, at saturation",
            ratio <= 1.15,
            &format!(
                "{:.1} µs vs {:.1} µs, {ratio:.2}x",
                full.cpu_sat_us, fm.cpu_sat_us
            ),
        );
    }
    if let Some(tls) = find("Ferrymesh 2 hops, mTLS") {
        let ratio = tls.cpu_sat_us / fm.cpu_sat_us;
        verdict(
            &mut out,
            "mTLS at most 1.3x the CPU per request of plaintext, at saturation",
            ratio <= 1.3,
            &format!(
                "{:.1} µs vs {:.1} µs, {ratio:.2}x",
                tls.cpu_sat_us, fm.cpu_sat_us
            ),
        );
    }
    out
}

/// The control plane with `proxies` simulated proxies over 30 services (each proxy calls 3):
/// time to connect them all, streams dropped, controller memory (and what closing the streams
/// gives back), and how long a policy edit takes to reach the proxies that call the edited
/// service (1,000 of 10,000).
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn control_plane(proxies: usize) -> anyhow::Result<String> {
    use std::sync::atomic::Ordering;
    const SERVICES: usize = 30;
    ferrymesh_test_support::sim::raise_fd_limit();
    let mut services = String::new();
    for s in 0..SERVICES {
        let _ = write!(
            services,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: sim}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}, namespace: sim, labels: {{kubernetes.io/service-name: svc-{s}}}}}\n\
             ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"10.1.{s}.1\"]}}, {{addresses: [\"10.1.{s}.2\"]}}, {{addresses: [\"10.1.{s}.3\"]}}]\n---\n"
        );
    }
    let policy = |secs: u32| {
        format!(
            "apiVersion: policy.ferrymesh.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: svc-0, namespace: sim}}\n\
             spec:\n  targetRefs: [{{group: \"\", kind: Service, name: svc-0}}]\n  timeouts: {{request: {secs}s}}\n"
        )
    };
    let mesh = Mesh::start(&[("services.yaml", &services), ("policy.yaml", &policy(5))]);
    let controller = mesh.controller.pid();
    let rss_before = procstat::rss_mib(controller);
    let fleet = ferrymesh_test_support::sim::Fleet {
        proxies,
        calls: 3,
        services: (0..SERVICES)
            .map(|s| format!("svc-{s}.sim.svc.cluster.local:80"))
            .collect(),
        connect_concurrency: 500,
    };
    let cpu_before = procstat::cpu_seconds(controller);
    let running = fleet.start(mesh.discovery);
    let seen = running.seen.clone();
    let connected = eventually(Duration::from_mins(5), || {
        let seen = seen.clone();
        async move {
            seen.synced.load(Ordering::Acquire) + seen.dropped.load(Ordering::Acquire) >= proxies
        }
    })
    .await;
    let cpu_connect = procstat::cpu_seconds(controller) - cpu_before;
    // Held for a while: keep-alive pings must be answered and nobody dropped.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss = procstat::rss_mib(controller);
    let callers = (0..proxies)
        .filter(|i| (0..3).any(|c| (i + c) % SERVICES == 0))
        .count();
    seen.watch_for("seconds: 7,");
    let written = tokio::time::Instant::now();
    mesh.write("policy.yaml", &policy(7));
    let _ = eventually(Duration::from_mins(1), || {
        let seen = seen.clone();
        async move { seen.arrivals().len() >= callers }
    })
    .await;
    let debounce = Duration::from_millis(250);
    let mut after: Vec<Duration> = seen
        .arrivals()
        .iter()
        .map(|t| t.duration_since(written).saturating_sub(debounce))
        .collect();
    let reached = after.len();
    let p50 = ferrymesh_test_support::sim::quantile(&mut after, 0.5);
    let p99 = ferrymesh_test_support::sim::quantile(&mut after, 0.99);
    let dropped = seen.dropped.load(Ordering::Acquire);
    let synced = seen.synced.load(Ordering::Acquire);
    let errors = format!(
        "{:?}",
        seen.errors.lock().map(|e| e.clone()).unwrap_or_default()
    );
    running.stop().await;
    // What the streams held is given back once they close (jemalloc returns it in the
    // background).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = procstat::rss_mib(controller);
    #[allow(clippy::cast_precision_loss)] // counts
    let per_stream_ms = cpu_connect * 1e3 / synced.max(1) as f64;
    let mut out = format!(
        "\nControl plane: {proxies} simulated proxies (one connection and stream each, each calling 3 of {SERVICES} services)\n\n"
    );
    let _ = writeln!(out, "| measure | value |\n|---|---:|");
    let _ = writeln!(
        out,
        "| connected (synced) | {synced} in {} |",
        connected.map_or_else(
            |_| "timeout".to_owned(),
            |d| format!("{:.1}s", d.as_secs_f64())
        )
    );
    let _ = writeln!(
        out,
        "| dropped | {dropped} {} |",
        if dropped > 0 { errors } else { String::new() }
    );
    let _ = writeln!(
        out,
        "| controller CPU per new stream | {per_stream_ms:.2} ms |"
    );
    let _ = writeln!(
        out,
        "| controller RSS before / at {proxies} streams / after they closed | {rss_before:.0} / {rss:.0} / {rss_after:.0} MiB |"
    );
    let _ = writeln!(
        out,
        "| policy edit reached (after the 250 ms debounce) | {reached} of {callers} proxies, p50 {} ms, p99 {} ms |",
        p50.as_millis(),
        p99.as_millis()
    );
    let _ = writeln!(out, "\nTargets (control plane):");
    verdict(
        &mut out,
        &format!("{proxies} proxies connected, none dropped"),
        synced == proxies && dropped == 0,
        &format!("{synced} synced, {dropped} dropped"),
    );
    verdict(
        &mut out,
        "the edit reaches 1,000 proxies with p99 under 100 ms after the debounce",
        reached == callers && p99 < Duration::from_millis(100),
        &format!("{reached} proxies, p99 {} ms", p99.as_millis()),
    );
    verdict(
        &mut out,
        "controller memory under 1 GiB",
        rss < 1024.0,
        &format!("{rss:.0} MiB"),
    );
    Ok(out)
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
#[allow(clippy::too_many_lines)] // the variants, set up in order
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.control_plane_only {
        print!("{}", control_plane(args.proxies).await?);
        return Ok(());
    }
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
    let (secure, tls_procs, variant) = secure_pair(upstream).await?;
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

    let mut rounds: Vec<Vec<Row>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (v, results) in variants.iter().zip(&mut rounds) {
            eprintln!("bench: round {round}/{}: {} ...", args.rounds, v.name);
            // NOTE: the tools run as child processes; this worker waits for them while the
            // other serves the upstream.
            results.push(tokio::task::block_in_place(|| measure(v, &args))?);
        }
    }
    let rows: Vec<Row> = rounds.iter().map(|r| medians(r)).collect();
    println!("{}", table(&rows, &args));
    print!("{}", verdicts(&rows));
    drop((
        mesh,
        server,
        policy_server,
        client,
        peers,
        secure,
        tls_procs,
    ));
    if args.proxies > 0 {
        eprintln!(
            "bench: control plane with {} simulated proxies ...",
            args.proxies
        );
        print!("{}", control_plane(args.proxies).await?);
    }
    Ok(())
}
