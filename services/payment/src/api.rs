//! The payment service's HTTP API, as `contracts/payment.yaml` specifies it: an
//! order's payments, and the order saga's charge and refund steps, idempotent by the
//! payment id they carry. A decline answers 409 `payment_declined`: a refusal the saga
//! does not retry.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventyr_cqrs::{CommandError, CommandHandler};
use eventyr_http::{
    ApiError, CUSTOMER_ID_RULE, Caller, CustomerBody, Faults, FieldError, ID_RULE, Input, Validate,
    check, command_failure, valid_customer_id, valid_id,
};
use serde::{Deserialize, Serialize};

use crate::domain::{AMOUNT_MAX_CENTS, CreditAccount, CreditCommand, CreditError, PaymentState};

/// Finds an order's payments (the read model the wiring provides).
pub type PaymentsOfOrder = Arc<
    dyn Fn(String) -> futures::future::BoxFuture<'static, Result<Vec<PaymentView>, ApiError>>
        + Send
        + Sync,
>;

/// The payment service's state.
#[derive(Clone)]
pub struct Payments {
    pub accounts: Arc<CommandHandler<CreditAccount>>,
    pub of_order: PaymentsOfOrder,
    pub faults: Faults,
}

/// A payment as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub payment_id: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    pub amount_cents: i64,
}

/// The public routes only: what the public API serves (the saga's steps stay on the
/// service's own listener).
pub fn public(payments: Payments) -> Router {
    public_routes().with_state(payments)
}

fn public_routes() -> Router<Payments> {
    Router::new().route("/api/payments", get(list))
}

/// The order saga's step this service serves.
pub const STEPS: [eventyr_http::StepRoute; 1] = [eventyr_http::StepRoute {
    step: "payment",
    action: "/internal/payments",
    compensation: Some("/internal/payments/{saga_id}/refund"),
}];

pub fn router(payments: Payments) -> Router {
    let steps = Router::new()
        .route("/internal/payments", post(charge))
        .route("/internal/payments/{payment_id}/refund", post(refund));
    let public = public_routes();
    let faults = payments.faults.clone();
    eventyr_http::service(public, steps, payments, &faults)
}

fn failure(error: CommandError<CreditError>) -> ApiError {
    command_failure(error, |rejected| {
        let message = rejected.to_string();
        match rejected {
            CreditError::Unknown => ApiError::not_found(message),
            CreditError::Exists => ApiError::conflict("exists", message),
            CreditError::BadAmount(_) => {
                ApiError::invalid(vec![FieldError::new("/amount_cents", message)])
            }
        }
    })
}

impl Payments {
    async fn execute(
        &self,
        customer_id: &str,
        id: String,
        body: CreditCommand,
    ) -> Result<CreditAccount, ApiError> {
        eventyr_http::execute_and_load(&self.accounts, customer_id, id, body, failure).await
    }
}

fn view(account: &CreditAccount, payment_id: &str) -> PaymentView {
    let payment = account.payment(payment_id);
    let status = match payment.map(|p| p.state) {
        Some(PaymentState::Charged) => "CHARGED",
        Some(PaymentState::Declined) => "DECLINED",
        Some(PaymentState::Refunded | PaymentState::Tombstoned) | None => "REFUNDED",
    };
    PaymentView {
        payment_id: payment_id.to_owned(),
        order_id: payment.map(|p| p.order_id.clone()).unwrap_or_default(),
        customer_id: account.customer_id.clone(),
        status: status.to_owned(),
        amount_cents: match payment.map(|p| p.state) {
            Some(PaymentState::Tombstoned) | None => 0,
            _ => payment.map_or(0, |p| p.amount_cents),
        },
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    order_id: Option<String>,
}

/// An order's payments: a customer sees only their own (another's order lists none).
async fn list(
    State(payments): State<Payments>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let order_id = query.order_id.unwrap_or_default();
    check("order_id", valid_id(&order_id), ID_RULE)?;
    let mut items = (payments.of_order)(order_id).await?;
    items.retain(|payment| caller.owns(&payment.customer_id));
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeBody {
    payment_id: String,
    order_id: String,
    customer_id: String,
    amount_cents: i64,
}

impl Validate for ChargeBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        for (name, id) in [
            ("/payment_id", &self.payment_id),
            ("/order_id", &self.order_id),
        ] {
            if !valid_id(id) {
                fields.push(FieldError::new(name, ID_RULE));
            }
        }
        if !valid_customer_id(&self.customer_id) {
            fields.push(FieldError::new("/customer_id", CUSTOMER_ID_RULE));
        }
        if !(0..=AMOUNT_MAX_CENTS).contains(&self.amount_cents) {
            fields.push(FieldError::new(
                "/amount_cents",
                format!("0 to {AMOUNT_MAX_CENTS}"),
            ));
        }
        fields
    }
}

/// Charges; a zero amount (an order paid entirely with points) charges nothing and
/// answers CHARGED.
async fn charge(
    State(payments): State<Payments>,
    Input(body): Input<ChargeBody>,
) -> Result<Json<PaymentView>, ApiError> {
    if body.amount_cents == 0 {
        let account = payments
            .accounts
            .load(&body.customer_id)
            .await
            .map_err(failure)?
            .state;
        if account.customer_id.is_empty() {
            return Err(ApiError::not_found(format!(
                "no customer {}",
                body.customer_id
            )));
        }
        return Ok(Json(PaymentView {
            payment_id: body.payment_id,
            order_id: body.order_id,
            customer_id: body.customer_id,
            status: "CHARGED".into(),
            amount_cents: 0,
        }));
    }
    let command = CreditCommand::Charge {
        payment_id: body.payment_id.clone(),
        order_id: body.order_id.clone(),
        amount_cents: body.amount_cents,
    };
    let id = format!("charge:{}", body.payment_id);
    let account = payments.execute(&body.customer_id, id, command).await?;
    let payment = account.payment(&body.payment_id);
    match payment.map(|p| p.state) {
        Some(PaymentState::Charged) => Ok(Json(view(&account, &body.payment_id))),
        Some(PaymentState::Declined) => Err(ApiError::conflict(
            "payment_declined",
            format!(
                "payment {} declined: over the credit limit of customer {}",
                body.payment_id, body.customer_id
            ),
        )),
        _ => Err(ApiError::conflict(
            "compensated",
            format!(
                "payment {} was refunded before it was made",
                body.payment_id
            ),
        )),
    }
}

async fn refund(
    State(payments): State<Payments>,
    Path(payment_id): Path<String>,
    Input(body): Input<CustomerBody>,
) -> Result<Json<PaymentView>, ApiError> {
    check("payment_id", valid_id(&payment_id), ID_RULE)?;
    let command = CreditCommand::Refund {
        payment_id: payment_id.clone(),
    };
    let id = format!("refund:{payment_id}");
    let account = payments.execute(&body.customer_id, id, command).await?;
    let mut shown = view(&account, &payment_id);
    shown.status = "REFUNDED".into();
    Ok(Json(shown))
}
