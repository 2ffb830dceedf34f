//! `catalog`: product names and descriptions (3 replicas in the demo).

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{PRODUCTS, error};

/// `GET /products`, `GET /products/{id}`.
pub fn routes() -> Router {
    Router::new()
        .route("/products", get(list))
        .route("/products/{id}", get(one))
}

fn product(id: u32, name: &str) -> serde_json::Value {
    json!({ "id": id, "name": name, "description": format!("{name}, as sold on the ferry") })
}

async fn list() -> Json<serde_json::Value> {
    Json(
        PRODUCTS
            .iter()
            .map(|(id, name, ..)| product(*id, name))
            .collect(),
    )
}

async fn one(Path(id): Path<u32>) -> Response {
    match PRODUCTS.iter().find(|p| p.0 == id) {
        Some((id, name, ..)) => Json(product(*id, name)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no product {id}")).into_response(),
    }
}
