//! Chaos knobs of one instance: error rate, added latency, hang rate, readiness and liveness.
//! Set at start from `CHAOS_*` env and at run time with `GET/PUT /chaos` (JSON; a PUT changes
//! only the fields it names; `{"reset": true}` restores the start values).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

/// The knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chaos {
    /// Fraction of business requests answered 500 (0..=1).
    pub error_rate: f64,
    /// Added before every business request, e.g. `"200ms"`.
    pub latency: String,
    /// Fraction of business requests that never get an answer (0..=1).
    pub hang_rate: f64,
    /// `/readyz` answers 200 when true, 503 when false.
    pub ready: bool,
    /// `/healthz` answers 200 when true, 500 when false.
    pub live: bool,
}

impl Default for Chaos {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            latency: "0s".into(),
            hang_rate: 0.0,
            ready: true,
            live: true,
        }
    }
}

/// A partial update, as `PUT /chaos` takes it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChaosUpdate {
    error_rate: Option<f64>,
    latency: Option<String>,
    hang_rate: Option<f64>,
    ready: Option<bool>,
    live: Option<bool>,
    #[serde(default)]
    reset: bool,
}

impl Chaos {
    /// The knobs from `CHAOS_ERROR_RATE`, `CHAOS_LATENCY`, `CHAOS_HANG_RATE`, `CHAOS_READY`,
    /// `CHAOS_LIVE`.
    ///
    /// # Errors
    /// A value does not parse or is out of range.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let update = ChaosUpdate {
            error_rate: env("CHAOS_ERROR_RATE").map(|v| v.parse()).transpose()?,
            latency: env("CHAOS_LATENCY"),
            hang_rate: env("CHAOS_HANG_RATE").map(|v| v.parse()).transpose()?,
            ready: env("CHAOS_READY").map(|v| v.parse()).transpose()?,
            live: env("CHAOS_LIVE").map(|v| v.parse()).transpose()?,
            reset: false,
        };
        let mut chaos = Chaos::default();
        chaos
            .apply(update, &Chaos::default())
            .map_err(|e| anyhow::anyhow!("CHAOS_*: {e}"))?;
        Ok(chaos)
    }

    fn apply(&mut self, u: ChaosUpdate, initial: &Chaos) -> Result<(), String> {
        let mut next = if u.reset {
            initial.clone()
        } else {
            self.clone()
        };
        if let Some(r) = u.error_rate {
            next.error_rate = r;
        }
        if let Some(l) = u.latency {
            next.latency = l;
        }
        if let Some(r) = u.hang_rate {
            next.hang_rate = r;
        }
        if let Some(r) = u.ready {
            next.ready = r;
        }
        if let Some(l) = u.live {
            next.live = l;
        }
        for (name, v) in [("errorRate", next.error_rate), ("hangRate", next.hang_rate)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be within 0..=1, got {v}"));
            }
        }
        parse_latency(&next.latency)?;
        *self = next;
        Ok(())
    }
}

fn parse_latency(text: &str) -> Result<Duration, String> {
    ferrymesh_proto::duration::parse(text).map_err(|e| format!("latency: {e}"))
}

/// Shared knobs plus the start values (for reset).
#[derive(Debug, Clone)]
pub struct Knobs {
    current: Arc<RwLock<Chaos>>,
    initial: Arc<Chaos>,
    /// The dice: seeded from `CHAOS_SEED` for a reproducible lab, from the OS otherwise.
    rng: Arc<std::sync::Mutex<rand::rngs::StdRng>>,
}

impl Knobs {
    /// Knobs starting at `initial`; with a `seed`, the same requests meet the same chaos.
    pub fn new(initial: Chaos, seed: Option<u64>) -> Self {
        use rand::SeedableRng as _;
        let rng = seed.map_or_else(
            rand::rngs::StdRng::from_os_rng,
            rand::rngs::StdRng::seed_from_u64,
        );
        Self {
            current: Arc::new(RwLock::new(initial.clone())),
            initial: Arc::new(initial),
            rng: Arc::new(std::sync::Mutex::new(rng)),
        }
    }

    /// The knobs now.
    pub fn get(&self) -> Chaos {
        self.current.read().expect("chaos lock poisoned").clone()
    }
}

/// `GET /chaos`.
#[allow(clippy::unused_async)] // axum handlers are async
pub async fn get(State(knobs): State<Knobs>) -> Json<Chaos> {
    Json(knobs.get())
}

/// `PUT /chaos`.
#[allow(clippy::unused_async)] // axum handlers are async
pub async fn put(State(knobs): State<Knobs>, Json(update): Json<ChaosUpdate>) -> Response {
    let mut current = knobs.current.write().expect("chaos lock poisoned");
    match current.apply(update, &knobs.initial) {
        Ok(()) => {
            tracing::info!(chaos = ?*current, "chaos changed");
            Json(current.clone()).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e })),
        )
            .into_response(),
    }
}

/// `/healthz`: liveness.
#[allow(clippy::unused_async)] // axum handlers are async
pub async fn healthz(State(knobs): State<Knobs>) -> Response {
    if knobs.get().live {
        (StatusCode::OK, "live\n").into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "not live (chaos)\n").into_response()
    }
}

/// `/readyz`: readiness.
#[allow(clippy::unused_async)] // axum handlers are async
pub async fn readyz(State(knobs): State<Knobs>) -> Response {
    if knobs.get().ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready (chaos)\n").into_response()
    }
}

/// Middleware on business routes: latency, then hang, then error, as configured.
pub async fn inject(State(knobs): State<Knobs>, req: Request, next: Next) -> Response {
    let chaos = knobs.get();
    let latency = parse_latency(&chaos.latency).unwrap_or_default();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (hang, error) = {
        let mut rng = knobs.rng.lock().expect("chaos rng lock poisoned");
        (
            rng.random_bool(chaos.hang_rate),
            rng.random_bool(chaos.error_rate),
        )
    };
    if hang {
        // Never answers; the caller's timeout (or the mesh's) has to deal with it.
        std::future::pending::<()>().await;
    }
    if error {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": "chaos: injected error" })),
        )
            .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_change_only_named_fields_and_reset_restores_start_values() {
        let initial = Chaos {
            latency: "10ms".into(),
            ..Chaos::default()
        };
        let mut c = initial.clone();
        c.apply(
            ChaosUpdate {
                error_rate: Some(1.0),
                ..Default::default()
            },
            &initial,
        )
        .unwrap();
        assert!((c.error_rate - 1.0).abs() < f64::EPSILON);
        assert_eq!(c.latency, "10ms");
        c.apply(
            ChaosUpdate {
                reset: true,
                ready: Some(false),
                ..Default::default()
            },
            &initial,
        )
        .unwrap();
        assert_eq!(
            c,
            Chaos {
                ready: false,
                ..initial.clone()
            }
        );
    }

    #[test]
    fn bad_values_are_refused_and_change_nothing() {
        let mut c = Chaos::default();
        assert!(
            c.apply(
                ChaosUpdate {
                    error_rate: Some(2.0),
                    ready: Some(false),
                    ..Default::default()
                },
                &Chaos::default()
            )
            .is_err()
        );
        assert!(
            c.apply(
                ChaosUpdate {
                    latency: Some("fast".into()),
                    ..Default::default()
                },
                &Chaos::default()
            )
            .is_err()
        );
        assert_eq!(c, Chaos::default());
    }

    #[test]
    fn a_seed_makes_the_chaos_reproducible() {
        use rand::Rng as _;
        let draws = |seed| {
            let knobs = Knobs::new(Chaos::default(), Some(seed));
            let mut rng = knobs.rng.lock().unwrap();
            (0..32).map(|_| rng.random_bool(0.3)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn env_sets_the_start_values() {
        let env = |k: &str| match k {
            "CHAOS_ERROR_RATE" => Some("0.5".to_owned()),
            "CHAOS_READY" => Some("false".to_owned()),
            _ => None,
        };
        let c = Chaos::from_env(env).unwrap();
        assert!((c.error_rate - 0.5).abs() < f64::EPSILON);
        assert!(!c.ready);
        assert!(Chaos::from_env(|k| (k == "CHAOS_HANG_RATE").then(|| "x".to_owned())).is_err());
    }
}
