//! The shipping service's HTTP API, as `contracts/shipping.yaml` specifies it: an
//! order's shipment, and the order saga's create and cancel steps, idempotent by the
//! order id (one shipment per order).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventyr_cqrs::{CommandError, CommandHandler};
use eventyr_http::{
    ApiError, CUSTOMER_ID_RULE, Caller, Faults, FieldError, ID_RULE, Input, Validate, check,
    command_failure, valid_customer_id, valid_id,
};
use serde::{Deserialize, Serialize};

use crate::domain::{Shipment, ShipmentCommand, ShipmentError, ShipmentState};

/// The shipping service's state.
#[derive(Clone)]
pub struct Shipping {
    pub shipments: Arc<CommandHandler<Shipment>>,
    pub faults: Faults,
}

/// The public routes only: what the public API serves (the saga's steps stay on the
/// service's own listener).
pub fn public(shipping: Shipping) -> Router {
    public_routes().with_state(shipping)
}

fn public_routes() -> Router<Shipping> {
    Router::new().route("/api/shipments", get(list))
}

/// The order saga's step this service serves.
pub const STEPS: [eventyr_http::StepRoute; 1] = [eventyr_http::StepRoute {
    step: "shipping",
    action: "/internal/shipments",
    compensation: Some("/internal/shipments/{saga_id}/cancel"),
}];

pub fn router(shipping: Shipping) -> Router {
    let steps = Router::new()
        .route("/internal/shipments", post(create))
        .route("/internal/shipments/{order_id}/cancel", post(cancel));
    let public = public_routes();
    let faults = shipping.faults.clone();
    eventyr_http::service(public, steps, shipping, &faults)
}

fn failure(error: CommandError<ShipmentError>) -> ApiError {
    command_failure(error, |rejected| match rejected {
        ShipmentError::Cancelled(_) => ApiError::conflict("compensated", rejected.to_string()),
    })
}

#[derive(Debug, Serialize)]
struct View {
    order_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    customer_id: String,
    status: &'static str,
}

fn view(shipment: Shipment) -> Option<View> {
    let status = match shipment.state {
        ShipmentState::None => return None,
        ShipmentState::Created => "CREATED",
        ShipmentState::Cancelled => "CANCELLED",
    };
    Some(View {
        order_id: shipment.order_id,
        customer_id: shipment.customer_id,
        status,
    })
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: Option<String>,
}

/// An order's shipment: a customer sees only their own (another's order lists none).
async fn list(
    State(shipping): State<Shipping>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let order_id = query.order_id.unwrap_or_default();
    check("order_id", valid_id(&order_id), ID_RULE)?;
    let shipment = shipping
        .shipments
        .load(&order_id)
        .await
        .map_err(failure)?
        .state;
    let items: Vec<View> = view(shipment)
        .into_iter()
        .filter(|shipment| caller.owns(&shipment.customer_id))
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    order_id: String,
    customer_id: String,
}

impl Validate for CreateBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !valid_id(&self.order_id) {
            fields.push(FieldError::new("/order_id", ID_RULE));
        }
        if !valid_customer_id(&self.customer_id) {
            fields.push(FieldError::new("/customer_id", CUSTOMER_ID_RULE));
        }
        fields
    }
}

async fn create(
    State(shipping): State<Shipping>,
    Input(body): Input<CreateBody>,
) -> Result<Json<View>, ApiError> {
    let command = ShipmentCommand::Create {
        order_id: body.order_id.clone(),
        customer_id: body.customer_id,
    };
    let id = format!("create:{}", body.order_id);
    let shipment =
        eventyr_http::execute_and_load(&shipping.shipments, &body.order_id, id, command, failure)
            .await?;
    view(shipment)
        .map(Json)
        .ok_or_else(|| ApiError::unavailable("the shipment was not recorded"))
}

async fn cancel(
    State(shipping): State<Shipping>,
    Path(order_id): Path<String>,
) -> Result<Json<View>, ApiError> {
    check("order_id", valid_id(&order_id), ID_RULE)?;
    let command = ShipmentCommand::Cancel {
        order_id: order_id.clone(),
    };
    let id = format!("cancel:{order_id}");
    let shipment =
        eventyr_http::execute_and_load(&shipping.shipments, &order_id, id, command, failure)
            .await?;
    view(shipment)
        .map(Json)
        .ok_or_else(|| ApiError::unavailable("the cancellation was not recorded"))
}
