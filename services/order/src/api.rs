//! The order service's HTTP API (`contracts/order.yaml`): placing an order (202 at
//! once; its saga runs in the background) and reading it; and the service's own saga
//! steps (`order`, whose compensation fails the order, and `complete`).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventyr_cqrs::{CommandError, CommandHandler};
use eventyr_http::{
    ApiError, CUSTOMER_ID_RULE, Caller, FieldError, ID_RULE, Input, Validate, check,
    command_failure, valid_customer_id, valid_id,
};
use eventyr_saga::{Failure, SagaHandle, StepHandler};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::domain::{LINES_MAX, Line, Order, OrderCommand, OrderError, QUANTITY_MAX, SagaMode};
use crate::saga::{SAGA_TYPE, data};

/// The price of a SKU, if it is in the catalog (the order service's copy of the
/// inventory's prices).
pub type PriceOf = Arc<dyn Fn(String) -> BoxFuture<'static, Option<i64>> + Send + Sync>;

/// A SKU's price, asked of the inventory at `inventory` (a base URL) over HTTP with
/// `headers` (the internal credential): services share no tables.
pub fn price_client(inventory: String, headers: HeaderMap) -> PriceOf {
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap_or_default();
    Arc::new(move |sku: String| {
        let (client, inventory) = (client.clone(), inventory.clone());
        async move {
            if !eventyr_http::valid_sku(&sku) {
                return None;
            }
            let url = format!("{inventory}/api/inventory/{sku}");
            // The price lookup is part of the order's trace.
            let response = client
                .get(url)
                .headers(eventyr_telemetry::trace::headers())
                .timeout(std::time::Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            let stock: serde_json::Value = response.json().await.ok()?;
            stock["price_cents"].as_i64()
        }
        .boxed()
    })
}

/// The most points one order uses.
pub const POINTS_MAX: u64 = 10_000_000;

/// The order service's state.
#[derive(Clone)]
pub struct Orders {
    pub orders: Arc<CommandHandler<Order>>,
    pub sagas: SagaHandle,
    pub prices: PriceOf,
    /// The order list's read model (`read::OrdersView`).
    pub read_models: Arc<dyn eventyr_store::readmodel::ReadModels>,
    /// How the sagas of new orders run.
    pub mode: SagaMode,
}

pub fn router(orders: Orders) -> Router {
    Router::new()
        .route("/api/orders", axum::routing::post(place).get(list))
        .route("/api/orders/{order_id}", get(show))
        .with_state(orders)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    customer_id: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// A page of orders, newest first, from the read model.
/// A customer's list is their own (also without `customer_id`); naming another
/// customer is 403. An admin's without `customer_id` is everyone's.
async fn list(
    State(orders): State<Orders>,
    caller: Caller,
    axum::extract::Query(query): axum::extract::Query<ListQuery>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    use eventyr_store::sql::SqlValue;
    let mut conditions = Vec::new();
    let mut params: Vec<SqlValue> = Vec::new();
    if let Some(customer) = &query.customer_id {
        check("customer_id", valid_customer_id(customer), CUSTOMER_ID_RULE)?;
    }
    if let Some(customer) = caller.list_scope(query.customer_id)? {
        params.push(customer.into());
        conditions.push(format!("customer_id = ${}", params.len()));
    }
    if let Some(status) = query.status {
        let known = ["PENDING", "COMPLETED", "FAILED", "CANCELLED"].contains(&status.as_str());
        check("status", known, "PENDING, COMPLETED, FAILED or CANCELLED")?;
        params.push(status.into());
        conditions.push(format!("status = ${}", params.len()));
    }
    let limit = query.limit.unwrap_or(20);
    check("limit", (1..=100).contains(&limit), "1 to 100")?;
    let paged = eventyr_cqrs::PagedQuery {
        projection: crate::read::ORDERS_VIEW.to_owned(),
        select: "SELECT order_id, seq, customer_id, status, items, total_cents, points_used, \
                 saga_id, failure_reason FROM orders"
            .to_owned(),
        filter: (!conditions.is_empty()).then(|| (conditions.join(" AND "), params)),
        key: "seq".to_owned(),
        limit,
        cursor: query.cursor,
    };
    let page = eventyr_cqrs::fetch_page(&*orders.read_models, paged, |row| {
        let text = |name: &str| row.text(name).unwrap_or_default().to_owned();
        Ok(json!({
            "order_id": text("order_id"),
            "customer_id": text("customer_id"),
            "status": text("status"),
            "items": serde_json::from_str::<serde_json::Value>(&text("items")).unwrap_or_default(),
            "total_cents": row.int("total_cents").unwrap_or(0),
            "points_used": row.int("points_used").unwrap_or(0),
            "saga_id": text("saga_id"),
            "failure_reason": row.text("failure_reason").map(crate::domain::failure_code),
        }))
    })
    .await
    .map_err(|e| match e {
        eventyr_cqrs::QueryError::InvalidCursor => {
            ApiError::invalid(vec![FieldError::new("cursor", "a cursor from next_cursor")])
        }
        other => ApiError::unavailable(other.to_string()),
    })?;
    Ok(axum::Json(
        json!({ "items": page.items, "next_cursor": page.next_cursor }),
    ))
}

fn failure(error: CommandError<OrderError>) -> ApiError {
    command_failure(error, |rejected| {
        let message = rejected.to_string();
        match rejected {
            OrderError::Exists(_) => ApiError::conflict("idempotency_conflict", message),
            OrderError::Unknown => ApiError::not_found(message),
            OrderError::Transition(..) => ApiError::conflict("conflict", message),
            _ => ApiError::invalid(vec![FieldError::new("", message)]),
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    sku: String,
    quantity: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceBody {
    customer_id: String,
    items: Vec<Item>,
    #[serde(default)]
    points_to_use: u64,
}

impl Validate for PlaceBody {
    fn validate(&self) -> Vec<FieldError> {
        let mut fields = Vec::new();
        if !valid_customer_id(&self.customer_id) {
            fields.push(FieldError::new("/customer_id", CUSTOMER_ID_RULE));
        }
        if !(1..=LINES_MAX).contains(&self.items.len()) {
            fields.push(FieldError::new("/items", format!("1 to {LINES_MAX} lines")));
        }
        let mut skus = BTreeSet::new();
        for (i, item) in self.items.iter().enumerate() {
            if !skus.insert(item.sku.as_str()) {
                fields.push(FieldError::new(
                    format!("/items/{i}/sku"),
                    "appears on two lines",
                ));
            }
            if !(1..=QUANTITY_MAX).contains(&item.quantity) {
                fields.push(FieldError::new(
                    format!("/items/{i}/quantity"),
                    format!("1 to {QUANTITY_MAX}"),
                ));
            }
        }
        if self.points_to_use > POINTS_MAX {
            fields.push(FieldError::new(
                "/points_to_use",
                format!("0 to {POINTS_MAX}"),
            ));
        }
        fields
    }
}

/// The order id for a request: from its idempotency key, scoped to the caller (the
/// same key from the same caller, the same order; from another caller, another
/// order), else fresh.
fn order_id(caller: &Caller, customer_id: &str, key: Option<&str>) -> String {
    let uuid = match key {
        Some(key) => uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("order:{}:{customer_id}:{key}", caller.subject()).as_bytes(),
        ),
        None => uuid::Uuid::now_v7(),
    };
    format!("ord-{}", uuid.simple())
}

#[derive(Debug, Serialize)]
struct Placed {
    order_id: String,
    status: &'static str,
}

/// Placing an order: for the caller's own customer id only (403 otherwise).
async fn place(
    State(orders): State<Orders>,
    caller: Caller,
    headers: HeaderMap,
    Input(body): Input<PlaceBody>,
) -> Result<Response, ApiError> {
    caller.act_for(&body.customer_id)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| (1..=200).contains(&k.len()))
                .ok_or_else(|| {
                    ApiError::invalid(vec![FieldError::new(
                        "Idempotency-Key",
                        "1 to 200 visible characters",
                    )])
                })?,
        ),
    };
    let mut lines = Vec::with_capacity(body.items.len());
    let mut unknown = Vec::new();
    for (i, item) in body.items.iter().enumerate() {
        match (orders.prices)(item.sku.clone()).await {
            Some(price_cents) => lines.push(Line {
                sku: item.sku.clone(),
                quantity: item.quantity,
                price_cents,
            }),
            None => unknown.push(FieldError::new(format!("/items/{i}/sku"), "no such SKU")),
        }
    }
    if !unknown.is_empty() {
        return Err(ApiError::invalid(unknown));
    }
    let order_id = order_id(&caller, &body.customer_id, key);
    // The command id carries the request's content: the same key with other content
    // is another command, which the order refuses (409), not a duplicate.
    let content =
        serde_json::to_string(&(&body.customer_id, &lines, body.points_to_use)).unwrap_or_default();
    let digest = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, content.as_bytes()).simple();
    let command = OrderCommand::Place {
        order_id: order_id.clone(),
        customer_id: body.customer_id.clone(),
        lines,
        points_used: body.points_to_use,
        saga_id: order_id.clone(),
        saga_mode: orders.mode,
    };
    let order = eventyr_http::execute_and_load(
        &orders.orders,
        &order_id,
        format!("place:{order_id}:{digest}"),
        command,
        failure,
    )
    .await
    .map_err(|e| {
        if e.code == "invalid_input" {
            // The order's own rules (points above the total): name the field.
            ApiError::invalid(vec![FieldError::new("/points_to_use", e.message)])
        } else {
            e
        }
    })?;
    // Idempotent: a retried request starts nothing new. A choreographed saga starts
    // with the OrderCreated event itself.
    if order.saga_mode == SagaMode::Orchestrated {
        orders
            .sagas
            .start_with_id(SAGA_TYPE, &order_id, data(&order), Some(order_id.clone()))
            .await
            .map_err(|e| ApiError::unavailable(format!("the order saga did not start: {e}")))?;
    }
    let placed = Placed {
        status: status_name(&order),
        order_id: order_id.clone(),
    };
    let location = format!("/api/orders/{order_id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(placed),
    )
        .into_response())
}

fn status_name(order: &Order) -> &'static str {
    use crate::domain::OrderStatus::*;
    match order.status {
        None | Pending => "PENDING",
        Completed => "COMPLETED",
        Failed => "FAILED",
        Cancelled => "CANCELLED",
    }
}

/// One order: someone else's is 404, as if there were none.
async fn show(
    State(orders): State<Orders>,
    caller: Caller,
    Path(order_id): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    check("order_id", valid_id(&order_id), ID_RULE)?;
    let order = orders.orders.load(&order_id).await.map_err(failure)?.state;
    let missing = format!("no order {order_id}");
    if order.order_id.is_empty() {
        return Err(ApiError::not_found(missing));
    }
    caller.read_of(&order.customer_id, missing)?;
    Ok(axum::Json(json!({
        "order_id": order.order_id,
        "customer_id": order.customer_id,
        "status": status_name(&order),
        "items": order.lines,
        "total_cents": order.total_cents,
        "points_used": order.points_used,
        "saga_id": order.saga_id,
        "saga_mode": order.saga_mode,
        "failure_reason": order.failure_reason.as_deref().map(crate::domain::failure_code),
    })))
}

/// The order service's own saga steps: `order` (forward nothing; its compensation
/// fails the order with the saga's reason) and `complete`.
pub fn steps(orders: Arc<CommandHandler<Order>>) -> Vec<(&'static str, StepHandler)> {
    let order: StepHandler = {
        let orders = Arc::clone(&orders);
        Arc::new(move |call| {
            let orders = Arc::clone(&orders);
            async move {
                if !call.compensation {
                    return Ok(json!({}));
                }
                let reason = call.body["reason"]
                    .as_str()
                    .unwrap_or("the order saga failed")
                    .to_owned();
                let id = call.saga_id.clone();
                let command = OrderCommand::Fail { reason };
                eventyr_http::execute(&orders, &id, format!("fail:{id}"), command, failure)
                    .await
                    .map(|()| json!({}))
                    .map_err(step_failure)
            }
            .boxed()
        })
    };
    let complete: StepHandler = Arc::new(move |call| {
        let orders = Arc::clone(&orders);
        async move {
            let id = call.saga_id.clone();
            eventyr_http::execute(
                &orders,
                &id,
                format!("complete:{id}"),
                OrderCommand::Complete,
                failure,
            )
            .await
            .map(|()| json!({}))
            .map_err(step_failure)
        }
        .boxed()
    });
    vec![("order", order), ("complete", complete)]
}

/// A local step's error as a saga failure: 5xx transient, the rest refusals.
fn step_failure(error: ApiError) -> Failure {
    Failure {
        error: format!("{}: {}", error.code, error.message),
        transient: error.status.is_server_error(),
    }
}

/// Starts the saga of every PENDING orchestrated order that has none (placed, then the
/// process died before its saga started; a choreographed one starts from its event).
/// Starts are idempotent, so running it at every start is safe. Returns how many
/// orders it looked at.
pub async fn restart_sagas(
    orders: &CommandHandler<Order>,
    store: &Arc<dyn eventyr_store::EventStore>,
    sagas: &SagaHandle,
) -> Result<usize, ApiError> {
    let (_, looked) =
        restart_sagas_from(orders, store, sagas, eventyr_core::Position::FIRST, None).await?;
    Ok(looked)
}

/// [`restart_sagas`] for the orders placed from `from` on, and (with `placed_before`)
/// only up to the first placed after that time — an order placed just now is still
/// starting its saga itself. Returns where the next look begins, and how many orders
/// it looked at.
async fn restart_sagas_from(
    orders: &CommandHandler<Order>,
    store: &Arc<dyn eventyr_store::EventStore>,
    sagas: &SagaHandle,
    from: eventyr_core::Position,
    placed_before: Option<eventyr_core::Timestamp>,
) -> Result<(eventyr_core::Position, usize), ApiError> {
    let mut looked = 0;
    use eventyr_store::{Filter, ReadAll};
    let prefix = format!("{}-", <Order as eventyr_cqrs::Aggregate>::KIND);
    let mut read = ReadAll::from(from)
        .limit(5_000)
        .filter(Filter::event_type_prefix("OrderCreated"));
    loop {
        let slice = store
            .read_all(&read)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        for event in &slice.events {
            if placed_before.is_some_and(|before| event.recorded_at > before) {
                return Ok((event.position, looked));
            }
            let Some(order_id) = event.stream_id.as_str().strip_prefix(&prefix) else {
                continue;
            };
            looked += 1;
            let order = orders.load(order_id).await.map_err(failure)?.state;
            if order.status == crate::domain::OrderStatus::Pending
                && order.saga_mode == SagaMode::Orchestrated
            {
                sagas
                    .start_with_id(SAGA_TYPE, order_id, data(&order), Some(order_id.to_owned()))
                    .await
                    .map_err(|e| ApiError::unavailable(e.to_string()))?;
            }
        }
        if slice.is_end() {
            return Ok((slice.next, looked));
        }
        read.from = slice.next;
    }
}

/// Keeps looking, every `every`, for orders placed more than `grace` ago whose saga
/// never started — a request cut off between placing the order and starting its saga
/// (a client gone, the gateway's timeout) — and starts them, until `shutdown`. Each
/// order is looked at once. A failed look is tried again at the next round.
pub async fn start_orphaned_sagas(
    orders: Arc<CommandHandler<Order>>,
    store: Arc<dyn eventyr_store::EventStore>,
    sagas: SagaHandle,
    every: std::time::Duration,
    grace: std::time::Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut from = eventyr_core::Position::FIRST;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = interval.tick() => {}
        }
        let before =
            eventyr_core::Timestamp::from_system_time(std::time::SystemTime::now() - grace);
        match restart_sagas_from(&orders, &store, &sagas, from, Some(before)).await {
            Ok((next, _)) => from = next,
            Err(error) => {
                tracing::warn!(error = %error.message, "looking for orders without a saga failed")
            }
        }
    }
}
