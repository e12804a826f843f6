//! `eventyr reconcile`: checks the reference system's cross-service invariants from
//! the services' stores (an audit reads them all; services themselves never do):
//! - inventory conservation: stocked = available + reserved + shipped, per SKU;
//! - a COMPLETED order has exactly one net charge (of the amount due after points),
//!   its points deducted, one shipment, and its stock shipped;
//! - a FAILED or CANCELLED order has no net charge, no deduction, no shipment and no
//!   stock held;
//! - points ledgers balance (credited = balance + deducted).
//!
//! Orders still PENDING are counted, not judged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use eventyr_core::Position;
use eventyr_cqrs::{Aggregate, CommandHandler, HandlerOptions, Upcasters};
use eventyr_store::{EventStore, Filter, ReadAll};
use order::domain::{Order, OrderStatus};
use payment::domain::{CreditAccount, PaymentState};
use points::domain::{DeductionState, PointsAccount};
use serde::Serialize;
use shipping::domain::{Shipment, ShipmentState};

use crate::config::Config;
use crate::stores;

/// One broken invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub check: &'static str,
    pub id: String,
    pub detail: String,
}

/// What a reconciliation found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub orders: BTreeMap<String, usize>,
    pub skus: usize,
    pub customers: usize,
    pub mismatches: Vec<Mismatch>,
}

struct Handlers {
    items: CommandHandler<inventory::domain::Item>,
    credit: CommandHandler<CreditAccount>,
    points: CommandHandler<PointsAccount>,
    shipments: CommandHandler<Shipment>,
    orders: CommandHandler<Order>,
    stores: BTreeMap<&'static str, Arc<dyn EventStore>>,
}

fn handler<A: Aggregate>(store: &Arc<dyn EventStore>) -> CommandHandler<A> {
    let options = HandlerOptions {
        cache_capacity: 0,
        ..HandlerOptions::default()
    };
    CommandHandler::new(Arc::clone(store), Arc::new(Upcasters::new()), options)
}

impl Handlers {
    fn open(data_dir: &Path, config: &Config) -> anyhow::Result<Self> {
        let dir = data_dir.join("services");
        let mut stores = BTreeMap::new();
        for name in ["inventory", "payment", "points", "shipping", "order"] {
            let path = dir.join(format!("{name}.db"));
            anyhow::ensure!(
                path.exists(),
                "no {name} store at {}: has `eventyr up` run with this data directory?",
                path.display()
            );
            stores.insert(name, stores::open_sqlite(&path, config)?);
        }
        Ok(Self {
            items: handler(&stores["inventory"]),
            credit: handler(&stores["payment"]),
            points: handler(&stores["points"]),
            shipments: handler(&stores["shipping"]),
            orders: handler(&stores["order"]),
            stores,
        })
    }
}

/// The ids of the aggregates of `kind` in `store`.
async fn ids(store: &Arc<dyn EventStore>, kind: &str) -> anyhow::Result<BTreeSet<String>> {
    let prefix = format!("{kind}-");
    let mut read = ReadAll::from(Position::FIRST)
        .limit(5_000)
        .filter(Filter::stream_prefix(prefix.clone()));
    let mut ids = BTreeSet::new();
    loop {
        let slice = store.read_all(&read).await?;
        for event in &slice.events {
            if let Some(id) = event.stream_id.as_str().strip_prefix(&prefix) {
                ids.insert(id.to_owned());
            }
        }
        if slice.is_end() {
            return Ok(ids);
        }
        read.from = slice.next;
    }
}

pub async fn check(data_dir: &Path, config: &Config) -> anyhow::Result<Report> {
    let h = Handlers::open(data_dir, config)?;
    let mut report = Report::default();
    let mut items = BTreeMap::new();
    for sku in ids(&h.stores["inventory"], "item").await? {
        let item = h.items.load(&sku).await?.state;
        if !item.conserved() {
            report.mismatches.push(Mismatch {
                check: "inventory_conservation",
                id: sku.clone(),
                detail: format!(
                    "stocked {} != available {} + reserved {} + shipped {}",
                    item.stocked,
                    item.available,
                    item.reserved_total(),
                    item.shipped
                ),
            });
        }
        items.insert(sku, item);
    }
    report.skus = items.len();
    let customers = ids(&h.stores["points"], "points").await?;
    report.customers = customers.len();
    for customer in &customers {
        let account = h.points.load(customer).await?.state;
        if !account.balanced() {
            report.mismatches.push(Mismatch {
                check: "points_ledger",
                id: customer.clone(),
                detail: format!(
                    "credited {} != balance {} + deducted",
                    account.credited, account.balance
                ),
            });
        }
    }
    // Each customer's accounts, loaded once (a busy customer has thousands of events).
    let mut credits: BTreeMap<String, CreditAccount> = BTreeMap::new();
    let mut ledgers: BTreeMap<String, PointsAccount> = BTreeMap::new();
    for order_id in ids(&h.stores["order"], "order").await? {
        let order = h.orders.load(&order_id).await?.state;
        let status = format!("{:?}", order.status).to_uppercase();
        *report.orders.entry(status).or_default() += 1;
        if order.status == OrderStatus::Pending || order.status == OrderStatus::None {
            continue;
        }
        let mut problems = Vec::new();
        if !credits.contains_key(&order.customer_id) {
            let account = h.credit.load(&order.customer_id).await?.state;
            credits.insert(order.customer_id.clone(), account);
        }
        let credit = &credits[&order.customer_id];
        let charged = credit
            .payment(&order_id)
            .is_some_and(|p| p.state == PaymentState::Charged);
        if !ledgers.contains_key(&order.customer_id) {
            let account = h.points.load(&order.customer_id).await?.state;
            ledgers.insert(order.customer_id.clone(), account);
        }
        let points = &ledgers[&order.customer_id];
        let deducted = points
            .deductions
            .get(&order_id)
            .is_some_and(|(_, s)| *s == DeductionState::Deducted);
        let shipped = h.shipments.load(&order_id).await?.state.state == ShipmentState::Created;
        let held: Vec<&str> = order
            .lines
            .iter()
            .filter(|l| {
                items
                    .get(&l.sku)
                    .is_some_and(|i| i.reserved.contains_key(&order_id))
            })
            .map(|l| l.sku.as_str())
            .collect();
        if order.status == OrderStatus::Completed {
            let due = order.amount_due_cents();
            let paid = credit
                .payment(&order_id)
                .filter(|p| p.state == PaymentState::Charged)
                .map_or(0, |p| p.amount_cents);
            if paid != due {
                problems.push(format!("charged {paid} cents, {due} due"));
            }
            if order.points_used > 0 && !deducted {
                problems.push("points not deducted".to_owned());
            }
            if !shipped {
                problems.push("no shipment".to_owned());
            }
            let unshipped: Vec<&str> = order
                .lines
                .iter()
                .filter(|l| {
                    !items
                        .get(&l.sku)
                        .is_some_and(|i| i.confirmed.contains(&order_id))
                })
                .map(|l| l.sku.as_str())
                .collect();
            if !unshipped.is_empty() {
                problems.push(format!("stock not shipped: {unshipped:?}"));
            }
        } else {
            if charged {
                problems.push("a net charge".to_owned());
            }
            if deducted {
                problems.push("points still deducted".to_owned());
            }
            if shipped {
                problems.push("a shipment".to_owned());
            }
            if !held.is_empty() {
                problems.push(format!("stock still reserved: {held:?}"));
            }
        }
        if !problems.is_empty() {
            report.mismatches.push(Mismatch {
                check: "order_outcome",
                id: order_id.clone(),
                detail: format!("{:?}: {}", order.status, problems.join("; ")),
            });
        }
    }
    Ok(report)
}

pub async fn run(config: &Config, json: bool) -> anyhow::Result<()> {
    let report = check(&config.data_dir, config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    anyhow::ensure!(
        report.mismatches.is_empty(),
        "{} invariant(s) broken",
        report.mismatches.len()
    );
    Ok(())
}

pub fn print(report: &Report) {
    println!(
        "reconciliation: {} SKUs, {} customers, orders {:?}",
        report.skus, report.customers, report.orders
    );
    if report.mismatches.is_empty() {
        println!("every invariant holds");
    }
    for mismatch in &report.mismatches {
        println!(
            "MISMATCH {} {}: {}",
            mismatch.check, mismatch.id, mismatch.detail
        );
    }
}
