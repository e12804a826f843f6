//! The shipping service: one shipment per order, created by the order saga and
//! cancelled when the order fails after it.
//!
//! - [`domain`]: the `Shipment` aggregate, pure.
//! - [`api`]: the HTTP API of `contracts/shipping.yaml`.

pub mod api;
pub mod domain;
