//! The points service's HTTP API, as `contracts/points.yaml` specifies it: a
//! customer's balance, and the order saga's deduct and restore steps, idempotent by
//! the deduction id they carry.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventyr_cqrs::{CommandError, CommandHandler};
use eventyr_http::{
    ApiError, CUSTOMER_ID_RULE, Caller, CustomerBody, Faults, FieldError, ID_RULE, Input, Validate,
    check, command_failure, valid_customer_id, valid_id,
};
use serde::{Deserialize, Serialize};

use crate::domain::{POINTS_MAX, PointsAccount, PointsCommand, PointsError};

/// The points service's state.
#[derive(Clone)]
pub struct Points {
    pub accounts: Arc<CommandHandler<PointsAccount>>,
    pub faults: Faults,
}

/// The public routes only: what the public API serves (the saga's steps stay on the
/// service's own listener).
pub fn public(points: Points) -> Router {
    public_routes().with_state(points)
}

fn public_routes() -> Router<Points> {
    Router::new().route("/api/customers/{customer_id}/points", get(balance))
}

/// The order saga's step this service serves.
pub const STEPS: [eventyr_http::StepRoute; 1] = [eventyr_http::StepRoute {
    step: "points",
    action: "/internal/points/deductions",
    compensation: Some("/internal/points/deductions/{saga_id}/restore"),
}];

pub fn router(points: Points) -> Router {
    let steps = Router::new()
        .route("/internal/points/deductions", post(deduct))
        .route(
            "/internal/points/deductions/{deduction_id}/restore",
            post(restore),
        );
    let public = public_routes();
    let faults = points.faults.clone();
    eventyr_http::service(public, steps, points, &faults)
}

fn failure(error: CommandError<PointsError>) -> ApiError {
    command_failure(error, |rejected| {
        let message = rejected.to_string();
        match rejected {
            PointsError::Unknown => ApiError::not_found(message),
            PointsError::Exists => ApiError::conflict("exists", message),
            PointsError::Insufficient { .. } => ApiError::conflict("insufficient_points", message),
            PointsError::Restored(_) => ApiError::conflict("compensated", message),
            PointsError::BadPoints(_) => {
                ApiError::invalid(vec![FieldError::new("/points", message)])
            }
        }
    })
}

impl Points {
    async fn execute(
        &self,
        customer_id: &str,
        id: String,
        body: PointsCommand,
    ) -> Result<PointsAccount, ApiError> {
        eventyr_http::execute_and_load(&self.accounts, customer_id, id, body, failure).await
    }
}

#[derive(Debug, Serialize)]
struct Balance {
    customer_id: String,
    balance: u64,
}

/// A customer's balance: someone else's is 404, as if there were none.
async fn balance(
    State(points): State<Points>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Json<Balance>, ApiError> {
    check(
        "customer_id",
        valid_customer_id(&customer_id),
        CUSTOMER_ID_RULE,
    )?;
    caller.read_of(&customer_id, format!("no customer {customer_id}"))?;
    let account = points
        .accounts
        .load(&customer_id)
        .await
        .map_err(failure)?
        .state;
    if account.customer_id.is_empty() {
        return Err(ApiError::not_found(format!("no customer {customer_id}")));
    }
    Ok(Json(Balance {
        customer_id,
        balance: account.balance,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeductBody {
    deduction_id: String,
    customer_id: String,
    points: u64,
}

impl Validate for DeductBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !valid_id(&self.deduction_id) {
            fields.push(FieldError::new("/deduction_id", ID_RULE));
        }
        if !valid_customer_id(&self.customer_id) {
            fields.push(FieldError::new("/customer_id", CUSTOMER_ID_RULE));
        }
        if !(1..=POINTS_MAX).contains(&self.points) {
            fields.push(FieldError::new("/points", format!("1 to {POINTS_MAX}")));
        }
        fields
    }
}

#[derive(Debug, Serialize)]
struct Deduction {
    deduction_id: String,
    points: u64,
    balance: u64,
}

async fn deduct(
    State(points): State<Points>,
    Input(body): Input<DeductBody>,
) -> Result<Json<Deduction>, ApiError> {
    let command = PointsCommand::Deduct {
        deduction_id: body.deduction_id.clone(),
        points: body.points,
    };
    let id = format!("deduct:{}", body.deduction_id);
    let account = points.execute(&body.customer_id, id, command).await?;
    let deducted = account
        .deductions
        .get(&body.deduction_id)
        .map_or(0, |(points, _)| *points);
    Ok(Json(Deduction {
        deduction_id: body.deduction_id,
        points: deducted,
        balance: account.balance,
    }))
}

async fn restore(
    State(points): State<Points>,
    Path(deduction_id): Path<String>,
    Input(body): Input<CustomerBody>,
) -> Result<Json<Deduction>, ApiError> {
    check("deduction_id", valid_id(&deduction_id), ID_RULE)?;
    let command = PointsCommand::Restore {
        deduction_id: deduction_id.clone(),
    };
    let id = format!("restore:{deduction_id}");
    let account = points.execute(&body.customer_id, id, command).await?;
    let restored = account
        .deductions
        .get(&deduction_id)
        .map_or(0, |(points, _)| *points);
    Ok(Json(Deduction {
        deduction_id,
        points: restored,
        balance: account.balance,
    }))
}
