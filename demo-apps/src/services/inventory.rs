//! `inventory`: stock per product and reservations (POST, not idempotent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{PRODUCTS, error};

#[derive(Debug, Clone)]
struct Stock(Arc<Mutex<HashMap<u32, u32>>>);

/// `GET /stock/{id}`, `POST /reservations`.
pub fn routes() -> Router {
    let stock = Stock(Arc::new(Mutex::new(
        PRODUCTS.iter().map(|p| (p.0, p.3)).collect(),
    )));
    Router::new()
        .route("/stock/{id}", get(stock_of))
        .route("/reservations", post(reserve))
        .with_state(stock)
}

async fn stock_of(State(stock): State<Stock>, Path(id): Path<u32>) -> Response {
    match stock.0.lock().expect("stock lock poisoned").get(&id) {
        Some(n) => Json(json!({ "id": id, "available": n })).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no product {id}")).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reservation {
    product_id: u32,
    quantity: u32,
}

async fn reserve(State(stock): State<Stock>, Json(r): Json<Reservation>) -> Response {
    let mut stock = stock.0.lock().expect("stock lock poisoned");
    let Some(n) = stock.get_mut(&r.product_id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no product {}", r.product_id),
        )
        .into_response();
    };
    if *n < r.quantity {
        return error(StatusCode::CONFLICT, format!("only {n} left")).into_response();
    }
    *n -= r.quantity;
    (
        StatusCode::CREATED,
        Json(json!({ "productId": r.product_id, "quantity": r.quantity, "remaining": *n })),
    )
        .into_response()
}
