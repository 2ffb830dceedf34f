//! `pricing`: the price of a product.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{PRODUCTS, error};

/// `GET /prices/{id}`.
pub fn routes() -> Router {
    Router::new().route("/prices/{id}", get(price))
}

async fn price(Path(id): Path<u32>) -> Response {
    match PRODUCTS.iter().find(|p| p.0 == id) {
        Some((id, _, cents, _)) => {
            Json(json!({ "id": id, "amount": f64::from(*cents) / 100.0, "currency": "EUR" }))
                .into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no price for {id}")).into_response(),
    }
}
