//! `storefront`: the shop's page. `GET /api/product-page?id=ID` fans out to catalog, pricing,
//! inventory and reviews in parallel and composes one JSON document; a part that failed is
//! reported in place (`{"error": ...}`) and listed in `failed`, never hidden. `GET /` is an HTML
//! page that shows the same, for a browser.

use std::fmt::Write as _;

use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{PRODUCTS, PeerError, Peers, Trace};

/// `GET /`, `GET /api/product-page?id=ID`.
pub fn routes(peers: Peers) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/product-page", get(product_page))
        .with_state(peers)
}

#[derive(Deserialize)]
struct Params {
    id: u32,
}

/// Composes the product page for `id`, in `trace`.
pub async fn compose(peers: &Peers, id: u32, trace: &Trace) -> Value {
    let paths = [
        format!("/products/{id}"),
        format!("/prices/{id}"),
        format!("/stock/{id}"),
        format!("/reviews?product={id}"),
    ];
    let (product, price, stock, reviews) = tokio::join!(
        peers.get("catalog", &paths[0], trace),
        peers.get("pricing", &paths[1], trace),
        peers.get("inventory", &paths[2], trace),
        peers.get("reviews", &paths[3], trace),
    );
    let mut failed = Vec::new();
    let mut part = |name: &str, r: Result<Value, PeerError>| match r {
        Ok(v) => v,
        Err(e) => {
            failed.push(name.to_owned());
            json!({ "error": e })
        }
    };
    let doc = json!({
        "id": id,
        "product": part("product", product),
        "price": part("price", price),
        "stock": part("stock", stock),
        "reviews": part("reviews", reviews),
    });
    let mut doc = doc;
    doc["failed"] = json!(failed);
    doc
}

async fn product_page(
    State(peers): State<Peers>,
    headers: axum::http::HeaderMap,
    Query(p): Query<Params>,
) -> Json<Value> {
    let trace = Trace::from_headers(&headers);
    tracing::info!(trace_id = %trace.trace_id, id = p.id, "product page");
    Json(compose(&peers, p.id, &trace).await)
}

fn show(v: &Value) -> String {
    match v.get("error") {
        Some(e) => format!(
            "<span class=err>unavailable ({})</span>",
            e.get("ferrymeshError").and_then(Value::as_str).map_or_else(
                || e.get("status")
                    .map_or_else(|| "no answer".to_owned(), ToString::to_string),
                |m| format!("mesh: {m}")
            )
        ),
        None => String::new(),
    }
}

async fn page(State(peers): State<Peers>, headers: axum::http::HeaderMap) -> Html<String> {
    let trace = Trace::from_headers(&headers);
    tracing::info!(trace_id = %trace.trace_id, "storefront page");
    let mut rows = String::new();
    for (id, ..) in PRODUCTS {
        let doc = compose(&peers, *id, &trace).await;
        let name = doc["product"]["name"]
            .as_str()
            .map_or_else(|| show(&doc["product"]), str::to_owned);
        let price = doc["price"]["amount"]
            .as_f64()
            .map_or_else(|| show(&doc["price"]), |a| format!("{a:.2} EUR"));
        let stock = doc["stock"]["available"]
            .as_u64()
            .map_or_else(|| show(&doc["stock"]), |n| n.to_string());
        let reviews = doc["reviews"]
            .as_array()
            .map_or_else(|| show(&doc["reviews"]), |r| format!("{} reviews", r.len()));
        let _ = writeln!(
            rows,
            "<tr><td><a href=\"/api/product-page?id={id}\">{id}</a></td><td>{name}</td><td>{price}</td><td>{stock}</td><td>{reviews}</td></tr>"
        );
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Ferry shop</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em 1em;text-align:left}}.err{{color:#b00}}</style></head>\
         <body><h1>Ferry shop</h1><p>Each row is composed from catalog, pricing, inventory and reviews, called through the mesh.</p>\
         <table><tr><th>id</th><th>product</th><th>price</th><th>stock</th><th>reviews</th></tr>\n{rows}</table></body></html>\n"
    ))
}
