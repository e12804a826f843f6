//! The inventory's HTTP API, as `contracts/inventory.yaml` specifies it: the public
//! stock view and restock, and the order saga's steps (reserve every line or none,
//! release, confirm), each idempotent by the reservation id it carries.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use eventyr_cqrs::{CommandError, CommandHandler};
use eventyr_http::{
    ApiError, Caller, Faults, FieldError, ID_RULE, Input, Validate, command_failure, valid_id,
};
use serde::{Deserialize, Serialize};

use crate::domain::{Item, ItemCommand, ItemError, QUANTITY_MAX};

/// The most lines one reservation holds.
pub const LINES_MAX: usize = 50;

/// The inventory service's state: its items and its demonstration faults.
#[derive(Clone)]
pub struct Inventory {
    pub items: Arc<CommandHandler<Item>>,
    pub faults: Faults,
}

/// The public and step routes (probes and conventions are added by the wiring).
/// The public routes only: what the public API serves (the saga's steps stay on the
/// service's own listener).
pub fn public(inventory: Inventory) -> Router {
    public_routes().with_state(inventory)
}

fn public_routes() -> Router<Inventory> {
    Router::new().route("/api/inventory/{sku}", get(stock).put(restock))
}

pub fn router(inventory: Inventory) -> Router {
    let steps = Router::new()
        .route("/internal/reservations", post(reserve))
        .route("/internal/reservations/{id}/release", post(release))
        .route("/internal/reservations/{id}/confirm", post(confirm));
    let public = public_routes();
    let faults = inventory.faults.clone();
    eventyr_http::service(public, steps, inventory, &faults)
}

/// SKU-1 … SKU-20, SKU-RARE: upper-case letters, digits and dashes.
pub use eventyr_http::valid_sku;

/// The order saga's steps this service serves.
pub const STEPS: [eventyr_http::StepRoute; 2] = [
    eventyr_http::StepRoute {
        step: "inventory",
        action: "/internal/reservations",
        compensation: Some("/internal/reservations/{saga_id}/release"),
    },
    eventyr_http::StepRoute {
        step: "confirm",
        action: "/internal/reservations/{saga_id}/confirm",
        compensation: None,
    },
];

fn check_sku(sku: &str) -> Result<(), ApiError> {
    if valid_sku(sku) {
        Ok(())
    } else {
        Err(ApiError::invalid(vec![FieldError::new(
            "sku",
            "1 to 32 of A-Z, 0-9 and '-'",
        )]))
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    eventyr_http::check("reservation_id", valid_id(id), ID_RULE)
}

/// A command's failure as the error body.
fn failure(error: CommandError<ItemError>) -> ApiError {
    command_failure(error, |rejected| {
        let message = rejected.to_string();
        match rejected {
            ItemError::Unknown => ApiError::not_found(message),
            ItemError::OutOfStock { .. } => ApiError::conflict("out_of_stock", message),
            ItemError::Released(_) => ApiError::conflict("compensated", message),
            ItemError::CannotLower { .. } => ApiError::conflict("cannot_lower_stock", message),
            ItemError::NoReservation(_) => ApiError::conflict("no_reservation", message),
            ItemError::Exists => ApiError::conflict("exists", message),
            ItemError::BadQuantity(_) | ItemError::BadPrice(_) => {
                ApiError::invalid(vec![FieldError::new("quantity", message)])
            }
        }
    })
}

impl Inventory {
    async fn execute(&self, sku: &str, id: String, body: ItemCommand) -> Result<(), ApiError> {
        eventyr_http::execute(&self.items, sku, id, body, failure).await
    }

    async fn item(&self, sku: &str) -> Result<Item, ApiError> {
        let loaded = self.items.load(sku).await.map_err(failure)?;
        if loaded.state.sku.is_empty() {
            return Err(ApiError::not_found(format!("no item {sku}")));
        }
        Ok(loaded.state)
    }
}

#[derive(Debug, Serialize)]
struct Stock {
    sku: String,
    available: u64,
    reserved: u64,
    price_cents: i64,
}

impl From<Item> for Stock {
    fn from(item: Item) -> Self {
        Self {
            reserved: item.reserved_total(),
            sku: item.sku,
            available: item.available,
            price_cents: item.price_cents,
        }
    }
}

async fn stock(
    State(inventory): State<Inventory>,
    Path(sku): Path<String>,
) -> Result<Json<Stock>, ApiError> {
    check_sku(&sku)?;
    Ok(Json(inventory.item(&sku).await?.into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestockBody {
    available: u64,
}

impl Validate for RestockBody {
    fn validate(&self) -> Vec<FieldError> {
        if self.available > 1_000_000 {
            vec![FieldError::new("/available", "at most 1000000")]
        } else {
            Vec::new()
        }
    }
}

/// Restocking: admins only.
async fn restock(
    State(inventory): State<Inventory>,
    caller: Caller,
    Path(sku): Path<String>,
    Input(body): Input<RestockBody>,
) -> Result<Json<Stock>, ApiError> {
    caller.require_admin()?;
    check_sku(&sku)?;
    let id = format!("restock:{sku}:{}", uuid_like());
    inventory
        .execute(
            &sku,
            id,
            ItemCommand::RestockTo {
                available: body.available,
            },
        )
        .await?;
    Ok(Json(inventory.item(&sku).await?.into()))
}

/// A fresh command id for commands that are not retried by a saga.
fn uuid_like() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    sku: String,
    quantity: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    reservation_id: String,
    items: Vec<Line>,
}

impl Validate for ReserveBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !valid_id(&self.reservation_id) {
            fields.push(FieldError::new("/reservation_id", ID_RULE));
        }
        if !(1..=LINES_MAX).contains(&self.items.len()) {
            fields.push(FieldError::new("/items", format!("1 to {LINES_MAX} lines")));
        }
        let mut skus = BTreeSet::new();
        for (i, line) in self.items.iter().enumerate() {
            if !valid_sku(&line.sku) {
                fields.push(FieldError::new(
                    format!("/items/{i}/sku"),
                    "1 to 32 of A-Z, 0-9 and '-'",
                ));
            } else if !skus.insert(line.sku.as_str()) {
                fields.push(FieldError::new(
                    format!("/items/{i}/sku"),
                    "appears on two lines",
                ));
            }
            if !(1..=QUANTITY_MAX.min(1000)).contains(&line.quantity) {
                fields.push(FieldError::new(format!("/items/{i}/quantity"), "1 to 1000"));
            }
        }
        fields
    }
}

#[derive(Debug, Serialize)]
struct ReservedLine {
    sku: String,
    quantity: u64,
    price_cents: i64,
}

#[derive(Debug, Serialize)]
struct Reservation {
    reservation_id: String,
    items: Vec<ReservedLine>,
    total_cents: i64,
}

/// Reserves every line or none: lines go in SKU order, and a refusal releases the ones
/// already held. (A crash half-way leaves some held; the saga then compensates with a
/// release of every line, which is idempotent.)
async fn reserve(
    State(inventory): State<Inventory>,
    Input(body): Input<ReserveBody>,
) -> Result<Json<Reservation>, ApiError> {
    let id = body.reservation_id;
    let mut lines = body.items;
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    let mut held: Vec<&str> = Vec::new();
    for line in &lines {
        let command = ItemCommand::Reserve {
            reservation_id: id.clone(),
            quantity: line.quantity,
        };
        if let Err(error) = inventory
            .execute(&line.sku, format!("reserve:{id}:{}", line.sku), command)
            .await
        {
            for sku in held {
                let undo = ItemCommand::Release {
                    reservation_id: id.clone(),
                };
                // Best effort; the saga's compensation releases every line anyway.
                let _ = inventory
                    .execute(sku, format!("release:{id}:{sku}"), undo)
                    .await;
            }
            return Err(error);
        }
        held.push(&line.sku);
    }
    let mut items = Vec::with_capacity(lines.len());
    let mut total_cents: i64 = 0;
    for line in &lines {
        let item = inventory.item(&line.sku).await?;
        let quantity = item.reserved.get(&id).copied().unwrap_or(line.quantity);
        total_cents += item.price_cents * i64::try_from(quantity).unwrap_or(i64::MAX / 2);
        items.push(ReservedLine {
            sku: line.sku.clone(),
            quantity,
            price_cents: item.price_cents,
        });
    }
    Ok(Json(Reservation {
        reservation_id: id,
        items,
        total_cents,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkusBody {
    skus: Vec<String>,
}

impl Validate for SkusBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !(1..=LINES_MAX).contains(&self.skus.len()) {
            fields.push(FieldError::new("/skus", format!("1 to {LINES_MAX} SKUs")));
        }
        for (i, sku) in self.skus.iter().enumerate() {
            if !valid_sku(sku) {
                fields.push(FieldError::new(
                    format!("/skus/{i}"),
                    "1 to 32 of A-Z, 0-9 and '-'",
                ));
            }
        }
        fields
    }
}

#[derive(Debug, Serialize)]
struct Done {
    reservation_id: String,
}

async fn release(
    State(inventory): State<Inventory>,
    Path(id): Path<String>,
    Input(body): Input<SkusBody>,
) -> Result<(StatusCode, Json<Done>), ApiError> {
    check_id(&id)?;
    for sku in &body.skus {
        let command = ItemCommand::Release {
            reservation_id: id.clone(),
        };
        match inventory
            .execute(sku, format!("release:{id}:{sku}"), command)
            .await
        {
            // An unknown item holds nothing: released, in effect.
            Ok(()) => {}
            Err(error) if error.status == StatusCode::NOT_FOUND => {}
            Err(error) => return Err(error),
        }
    }
    Ok((StatusCode::OK, Json(Done { reservation_id: id })))
}

async fn confirm(
    State(inventory): State<Inventory>,
    Path(id): Path<String>,
    Input(body): Input<SkusBody>,
) -> Result<Json<Done>, ApiError> {
    check_id(&id)?;
    for sku in &body.skus {
        let command = ItemCommand::Confirm {
            reservation_id: id.clone(),
        };
        inventory
            .execute(sku, format!("confirm:{id}:{sku}"), command)
            .await?;
    }
    Ok(Json(Done { reservation_id: id }))
}
