//! `orders`: `POST /orders` charges `payments` and reserves at `inventory` (not idempotent
//! unless the caller sends `Idempotency-Key`, which is passed on to payments).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{PRODUCTS, Peers, Trace, error};

#[derive(Debug, Clone)]
struct Orders {
    peers: Peers,
    placed: Arc<Mutex<Vec<Value>>>,
}

/// `POST /orders`, `GET /orders/{id}`.
pub fn routes(peers: Peers) -> Router {
    Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(one))
        .with_state(Orders {
            peers,
            placed: Arc::default(),
        })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewOrder {
    product_id: u32,
    #[serde(default = "one_item")]
    quantity: u32,
}

fn one_item() -> u32 {
    1
}

async fn place(
    State(orders): State<Orders>,
    headers: HeaderMap,
    Json(order): Json<NewOrder>,
) -> Response {
    let Some((_, _, cents, _)) = PRODUCTS.iter().find(|p| p.0 == order.product_id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no product {}", order.product_id),
        )
        .into_response();
    };
    let id = orders.placed.lock().expect("orders lock poisoned").len() + 1;
    let trace = Trace::from_headers(&headers);
    tracing::info!(trace_id = %trace.trace_id, order = id, "placing an order");
    let key: Vec<(&str, String)> = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| ("idempotency-key", k.to_owned()))
        .into_iter()
        .collect();
    let reservation = orders
        .peers
        .post(
            "inventory",
            "/reservations",
            &json!({ "productId": order.product_id, "quantity": order.quantity }),
            &[],
            &trace,
        )
        .await;
    let reservation = match reservation {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                Json(json!({ "error": "inventory failed", "cause": e })),
            )
                .into_response();
        }
    };
    let amount = f64::from(cents * order.quantity) / 100.0;
    let payment = match orders
        .peers
        .post(
            "payments",
            "/payments",
            &json!({ "orderId": id, "amount": amount }),
            &key,
            &trace,
        )
        .await
    {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                Json(json!({ "error": "payment failed", "cause": e })),
            )
                .into_response();
        }
    };
    let placed = json!({ "id": id, "productId": order.product_id, "quantity": order.quantity, "payment": payment, "reservation": reservation });
    orders
        .placed
        .lock()
        .expect("orders lock poisoned")
        .push(placed.clone());
    (StatusCode::CREATED, Json(placed)).into_response()
}

async fn one(State(orders): State<Orders>, Path(id): Path<usize>) -> Response {
    let placed = orders.placed.lock().expect("orders lock poisoned");
    match id.checked_sub(1).and_then(|i| placed.get(i)) {
        Some(o) => Json(o.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no order {id}")).into_response(),
    }
}
