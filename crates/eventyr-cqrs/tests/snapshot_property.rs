//! Property: an aggregate loaded from a snapshot and the events after it has exactly
//! the state (and version) of the same aggregate loaded from all its events, whatever
//! the commands and wherever the snapshots fell.

mod common;

use std::sync::Arc;

use common::bank::{Account, AccountCommand, upcasters};
use eventyr_cqrs::{Command, CommandHandler, HandlerOptions};
use eventyr_store::{EventStore, MemoryStore};
use proptest::prelude::*;

fn command() -> impl Strategy<Value = AccountCommand> {
    prop_oneof![
        (1i64..500).prop_map(|amount| AccountCommand::Deposit { amount }),
        (1i64..500).prop_map(|amount| AccountCommand::Withdraw { amount }),
        (1i64..500).prop_map(|amount| AccountCommand::Transfer {
            to: "elsewhere".into(),
            amount
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn snapshots_never_change_the_loaded_state(commands in prop::collection::vec(command(), 0..60), every in 1u64..12) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
            let options = HandlerOptions { snapshot_every: Some(every), ..HandlerOptions::default() };
            let snapshotting = CommandHandler::<Account>::new(Arc::clone(&store), Arc::new(upcasters()), options);
            let replaying = CommandHandler::<Account>::new(Arc::clone(&store), Arc::new(upcasters()), HandlerOptions::default());
            let open = AccountCommand::Open { id: "p".into(), owner: "ann".into() };
            snapshotting.execute(Command::new("p", open)).await.expect("open");
            for body in commands {
                // Rejections (insufficient funds) are part of the sequence too.
                let _ = snapshotting.execute(Command::new("p", body)).await;
            }
            let fast = snapshotting.load("p").await.expect("load with snapshots");
            let slow = replaying.load("p").await.expect("load from events");
            prop_assert_eq!(&fast.state, &slow.state);
            prop_assert_eq!(fast.version, slow.version);
            let events = slow.replayed as u64;
            if events >= every {
                prop_assert!(fast.snapshot.is_some(), "{} events, a snapshot every {}", events, every);
            }
            Ok(())
        })?;
    }
}
