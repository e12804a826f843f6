//! The points (loyalty) service: each customer's balance; orders deduct points and
//! failed orders restore them.
//!
//! - [`domain`]: the `PointsAccount` aggregate, pure.

pub mod domain;
