//! Idle connections are cheap and their memory comes back: 3,000 keep-alive connections, each
//! after one request, cost the proxy a bounded amount of memory, and once they close the
//! proxy's resident memory falls back (jemalloc's background thread returns freed pages).
//! The per-connection figure for a release build is in `make bench`; this debug build's
//! futures are larger, hence the looser bound here.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrymesh_test_support::mesh::{Mesh, ProxySpec, client_proxy, eventually};
use ferrymesh_test_support::upstream::HttpEcho;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";
const CONNECTIONS: u64 = 3_000;

/// A process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_cheap_and_their_memory_comes_back() {
    let mesh = Mesh::start(&[("services.yaml", SERVICES)]);
    let echo = HttpEcho::start("echo-1").await;
    let _server = mesh.proxy(&ProxySpec::app("echo-1", "echo", echo.addr));
    let proxy = client_proxy(&mesh, "echo.shop", 1).await;
    let (outbound, pid) = (proxy.addr("outbound"), proxy.pid());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        tcp.write_all(b"GET http://echo.shop/ HTTP/1.1\r\nhost: echo.shop\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.unwrap();
        assert_eq!(&head[9..12], b"200");
        idle.push(tcp);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss_kib(pid);
    let per_connection = (during.saturating_sub(before)) * 1024 / CONNECTIONS;
    eprintln!("{CONNECTIONS} idle connections: {per_connection} bytes each (debug build)");
    assert!(per_connection < 20 * 1024, "{per_connection} bytes each");
    drop(idle);
    let burst = during.saturating_sub(before);
    let returned = eventually(Duration::from_mins(1), || async {
        rss_kib(pid) < before + burst / 4
    })
    .await;
    assert!(
        returned.is_ok(),
        "memory not returned: {before} KiB before, {during} during, {} now",
        rss_kib(pid)
    );
    eprintln!("returned within {:?}", returned.unwrap());
}
