//! `reviews`: what customers said about a product.

use axum::extract::Query;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

/// `GET /reviews?product=ID`.
pub fn routes() -> Router {
    Router::new().route("/reviews", get(reviews))
}

#[derive(Deserialize)]
struct Params {
    product: u32,
}

async fn reviews(Query(p): Query<Params>) -> Json<serde_json::Value> {
    let stars = (p.product % 5) + 1;
    Json(json!([
        { "product": p.product, "rating": stars, "text": "Arrived on time, like the ferry." },
        { "product": p.product, "rating": 5u32.saturating_sub(stars % 3), "text": "Would buy again." },
    ]))
}
