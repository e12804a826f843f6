//! The points (loyalty) service: each customer's balance; orders deduct points and
//! failed orders restore them.
//!
//! - [`domain`]: the `PointsAccount` aggregate, pure.
//! - [`api`]: the HTTP API of `contracts/points.yaml`.

pub mod api;
pub mod domain;
