//! The payment service's read side: an order's payments, found in its own store.

use std::sync::Arc;

use eventyr_core::Position;
use eventyr_store::{EventStore, Filter, ReadAll};
use futures::FutureExt;

use eventyr_cqrs::DomainEvent;

use crate::api::{PaymentView, PaymentsOfOrder};

/// An order's payments, from the payment store's events (a scan; a read model
/// indexed by order comes with the rest of the read side).
pub fn payments_of_order(store: &Arc<dyn EventStore>) -> PaymentsOfOrder {
    let store = Arc::clone(store);
    Arc::new(move |order_id: String| {
        let store = Arc::clone(&store);
        async move {
            use crate::domain::CreditEvent;
            let mut read = ReadAll::from(Position::FIRST)
                .limit(1000)
                .filter(Filter::event_type_prefix("Payment"));
            let mut found: Vec<PaymentView> = Vec::new();
            loop {
                let slice = store
                    .read_all(&read)
                    .await
                    .map_err(|e| eventyr_http::ApiError::unavailable(e.to_string()))?;
                for event in &slice.events {
                    let Ok(decoded) = CreditEvent::from_stored(&event.event_type, &event.data)
                    else {
                        continue;
                    };
                    let customer = event
                        .stream_id
                        .as_str()
                        .strip_prefix("credit-")
                        .unwrap_or_default()
                        .to_owned();
                    let (id, status, amount) = match decoded {
                        CreditEvent::PaymentProcessed {
                            payment_id,
                            order_id: of,
                            amount_cents,
                            ..
                        } if of == order_id => (payment_id, "CHARGED", amount_cents),
                        CreditEvent::PaymentFailed {
                            payment_id,
                            order_id: of,
                            amount_cents,
                            ..
                        } if of == order_id => (payment_id, "DECLINED", amount_cents),
                        CreditEvent::PaymentRefunded { payment_id, .. } => {
                            if let Some(p) = found.iter_mut().find(|p| p.payment_id == payment_id) {
                                p.status = "REFUNDED".into();
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    found.push(PaymentView {
                        payment_id: id,
                        order_id: order_id.clone(),
                        customer_id: customer,
                        status: status.into(),
                        amount_cents: amount,
                    });
                }
                if slice.is_end() {
                    return Ok(found);
                }
                read.from = slice.next;
            }
        }
        .boxed()
    })
}
