//! The order service: customers place orders, which stay PENDING while the order saga
//! runs, then end COMPLETED, FAILED (with the reason) or CANCELLED.
//!
//! - [`domain`]: the `Order` aggregate, pure.
//! - [`saga`]: the order saga's definition, pure.
//! - [`read`]: the order list's projection.
//! - [`api`]: the HTTP API of `contracts/order.yaml`, and the service's own saga steps.

pub mod api;
pub mod domain;
pub mod read;
pub mod saga;
