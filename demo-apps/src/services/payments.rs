//! `payments`: charges. `POST /payments` honours `Idempotency-Key` (the same key returns the
//! first charge instead of charging twice); `GET /payments` lists every charge, so a lab can
//! count double charges caused by unsafe retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

#[derive(Debug, Default)]
struct Ledger {
    charges: Vec<Value>,
    by_key: HashMap<String, usize>,
}

/// `POST /payments`, `GET /payments`.
pub fn routes() -> Router {
    Router::new()
        .route("/payments", get(list).post(charge))
        .with_state(Arc::new(Mutex::new(Ledger::default())))
}

async fn list(State(ledger): State<Arc<Mutex<Ledger>>>) -> Json<Value> {
    Json(Value::Array(
        ledger.lock().expect("ledger lock poisoned").charges.clone(),
    ))
}

async fn charge(
    State(ledger): State<Arc<Mutex<Ledger>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut ledger = ledger.lock().expect("ledger lock poisoned");
    if let Some(i) = key.as_ref().and_then(|k| ledger.by_key.get(k)) {
        return (StatusCode::OK, Json(ledger.charges[*i].clone())).into_response();
    }
    let charge = json!({ "id": ledger.charges.len() + 1, "amount": body.get("amount"), "orderId": body.get("orderId"), "idempotencyKey": key });
    ledger.charges.push(charge.clone());
    if let Some(k) = key {
        let i = ledger.charges.len() - 1;
        ledger.by_key.insert(k, i);
    }
    (StatusCode::CREATED, Json(charge)).into_response()
}
