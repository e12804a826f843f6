//! The order service: customers place orders, which stay PENDING while the order saga
//! runs, then end COMPLETED, FAILED (with the reason) or CANCELLED.
//!
//! - [`domain`]: the `Order` aggregate, pure.

pub mod domain;
