//! The bus conformance suite on NATS JetStream.

mod common;

use common::Nats;

eventyr_bus::bus_suite!(Nats);
