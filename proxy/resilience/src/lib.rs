//! Ferrymesh resilience: tower middleware only. Each module is one pattern as `Foo<S>` +
//! `FooLayer` + `ResponseFuture` + `FooError`; none of them knows about config, discovery or
//! protobuf, so each is tested alone with `tower-test` and paused time.
//!
//! - [`timeout`]: a deadline on the whole call (the outbound request timeout).

pub mod breaker;
pub mod budget;
pub mod cache;
pub mod outlier;
pub mod replay;
pub mod retry;
pub mod timeout;
mod window;
