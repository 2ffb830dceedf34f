use super::*;

fn config() -> BreakerConfig {
    BreakerConfig {
        max_requests: 100,
        consecutive_failures: 3,
        failure_ratio: 0.5,
        minimum_requests: 10,
        window: Duration::from_secs(10),
        open_base: Duration::from_secs(5),
        open_max: Duration::from_mins(1),
        open_jitter: 0.0,
        half_open_probes: 2,
    }
}

fn call(b: &Breaker, failed: bool) -> Result<(), BreakerError> {
    b.try_acquire().map(|p| p.record(failed))
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_it_and_calls_fail_fast() {
    let b = Breaker::new(config(), None);
    call(&b, true).unwrap();
    call(&b, false).unwrap(); // a success resets the run
    for _ in 0..3 {
        call(&b, true).unwrap();
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(call(&b, false), Err(BreakerError::Open));
}

#[tokio::test(start_paused = true)]
async fn a_failure_ratio_over_enough_calls_opens_it() {
    let mut c = config();
    c.consecutive_failures = 0;
    let b = Breaker::new(c, None);
    for i in 0..9 {
        call(&b, i % 2 == 0).unwrap(); // 5 failures of 9: below the minimum of 10 calls
    }
    assert_eq!(b.state(), State::Closed);
    call(&b, false).unwrap(); // 5 of 10 = 0.5
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn old_calls_leave_the_window() {
    let mut c = config();
    c.consecutive_failures = 0;
    let b = Breaker::new(c, None);
    for _ in 0..9 {
        call(&b, true).unwrap();
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    call(&b, true).unwrap(); // only one call in the window now
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_probes_close_it_and_a_failed_probe_reopens_for_longer() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let b = Breaker::new(config(), Some(Arc::new(move |s| e.lock().unwrap().push(s))));
    for _ in 0..3 {
        call(&b, true).unwrap();
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    // One probe at a time.
    let probe = b.try_acquire().unwrap();
    assert_eq!(b.try_acquire().unwrap_err(), BreakerError::Open);
    probe.record(true);
    assert_eq!(b.state(), State::Open);
    // Second trip in a row: 10s.
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(call(&b, false), Err(BreakerError::Open));
    tokio::time::advance(Duration::from_secs(1)).await;
    call(&b, false).unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    call(&b, false).unwrap();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(
        *events.lock().unwrap(),
        [
            State::Open,
            State::HalfOpen,
            State::Open,
            State::HalfOpen,
            State::Closed
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_bulkhead_limits_calls_in_flight() {
    let mut c = config();
    c.max_requests = 2;
    let b = Breaker::new(c, None);
    let a = b.try_acquire().unwrap();
    let _b2 = b.try_acquire().unwrap();
    assert_eq!(b.try_acquire().unwrap_err(), BreakerError::Full);
    drop(a); // cancelled: frees the slot, counts as nothing
    assert!(b.try_acquire().is_ok());
}

#[test]
fn open_time_grows_per_trip_with_jitter_in_bounds() {
    let mut c = config();
    c.open_jitter = 0.5;
    let b = Breaker::new(c, None);
    for (trip, base) in [(1, 5.0), (2, 10.0), (3, 20.0), (5, 60.0), (9, 60.0)] {
        for _ in 0..20 {
            let t = b.open_time(trip).as_secs_f64();
            assert!(
                t >= base * 0.5 - 1e-9 && t <= base * 1.5 + 1e-9,
                "trip {trip}: {t}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn manual_trip_isolate_and_reset() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let heard = seen.clone();
    let on_change: OnChange = Arc::new(move |s| heard.lock().unwrap().push(s));
    let b = Breaker::new(config(), Some(on_change));
    // A trip by hand behaves like a real one: open for the open time, then half-open probes.
    b.trip();
    assert_eq!(call(&b, false), Err(BreakerError::Open));
    tokio::time::advance(Duration::from_secs(5)).await;
    call(&b, false).unwrap();
    call(&b, false).unwrap();
    assert_eq!(b.state(), State::Closed);
    // Isolated: open however long it waits, and calls' outcomes change nothing.
    b.isolate();
    tokio::time::advance(Duration::from_hours(1)).await;
    assert_eq!(b.state(), State::Isolated);
    assert_eq!(call(&b, false), Err(BreakerError::Open));
    b.reset();
    assert_eq!(b.state(), State::Closed);
    call(&b, false).unwrap();
    // Reset forgets the history: two failures do not add to earlier ones.
    for _ in 0..2 {
        call(&b, true).unwrap();
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            State::Open,
            State::HalfOpen,
            State::Closed,
            State::Isolated,
            State::Closed
        ]
    );
}
