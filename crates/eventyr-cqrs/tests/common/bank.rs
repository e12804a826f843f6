//! A small bank: accounts that open, take deposits and withdrawals, and transfer to
//! other accounts. Rules: amounts are positive, a balance never goes negative, and an
//! account cannot transfer to itself. Amounts are in cents.

use eventyr_cqrs::{AdjacentlyTagged, Aggregate};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub open: bool,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub transactions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    Open { id: String, owner: String },
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
    Transfer { to: String, amount: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum AccountEvent {
    /// Schema version 3: v1 had `name`, v2 renamed it `owner`, v3 added `currency`.
    Opened {
        id: String,
        owner: String,
        currency: String,
    },
    Deposited {
        amount: i64,
        balance: i64,
    },
    Withdrawn {
        amount: i64,
        balance: i64,
    },
    TransferredOut {
        to: String,
        amount: i64,
        balance: i64,
    },
}

impl AdjacentlyTagged for AccountEvent {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("amounts must be positive, got {0}")]
    NonPositiveAmount(i64),
    #[error("the balance {balance} does not cover {amount}")]
    InsufficientFunds { balance: i64, amount: i64 },
    #[error("an account cannot transfer to itself")]
    SelfTransfer,
}

impl Aggregate for Account {
    const KIND: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand::*;
        if let Open { id, owner } = command {
            if self.open {
                return Err(AccountError::AlreadyOpen);
            }
            return Ok(vec![AccountEvent::Opened {
                id: id.clone(),
                owner: owner.clone(),
                currency: "EUR".into(),
            }]);
        }
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        let amount = match command {
            Deposit { amount } | Withdraw { amount } | Transfer { amount, .. } => *amount,
            Open { .. } => unreachable!("handled above"),
        };
        if amount <= 0 {
            return Err(AccountError::NonPositiveAmount(amount));
        }
        match command {
            Deposit { .. } => Ok(vec![AccountEvent::Deposited {
                amount,
                balance: self.balance + amount,
            }]),
            Withdraw { .. } | Transfer { .. } if amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    amount,
                })
            }
            Transfer { to, .. } if *to == self.id => Err(AccountError::SelfTransfer),
            Withdraw { .. } => Ok(vec![AccountEvent::Withdrawn {
                amount,
                balance: self.balance - amount,
            }]),
            Transfer { to, .. } => Ok(vec![AccountEvent::TransferredOut {
                to: to.clone(),
                amount,
                balance: self.balance - amount,
            }]),
            Open { .. } => unreachable!("handled above"),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        self.transactions += 1;
        match event {
            AccountEvent::Opened {
                id,
                owner,
                currency,
            } => {
                self.open = true;
                self.id = id.clone();
                self.owner = owner.clone();
                self.currency = currency.clone();
            }
            AccountEvent::Deposited { balance, .. }
            | AccountEvent::Withdrawn { balance, .. }
            | AccountEvent::TransferredOut { balance, .. } => self.balance = *balance,
        }
    }

    fn command_name(command: &AccountCommand) -> &'static str {
        match command {
            AccountCommand::Open { .. } => "open",
            AccountCommand::Deposit { .. } => "deposit",
            AccountCommand::Withdraw { .. } => "withdraw",
            AccountCommand::Transfer { .. } => "transfer",
        }
    }
}

/// The upcasters of the bank's history: `Opened` v1 `{id, name}` → v2 `{id, owner}` →
/// v3 `{id, owner, currency}` (EUR for accounts opened before currencies).
pub fn upcasters() -> eventyr_cqrs::Upcasters {
    eventyr_cqrs::Upcasters::new()
        .step("Opened", 1, |mut data| {
            let object = data.as_object_mut().ok_or("Opened v1 is not an object")?;
            let name = object.remove("name").ok_or("Opened v1 has no name")?;
            object.insert("owner".into(), name);
            Ok(data)
        })
        .step("Opened", 2, |mut data| {
            let object = data.as_object_mut().ok_or("Opened v2 is not an object")?;
            object.insert("currency".into(), "EUR".into());
            Ok(data)
        })
}

/// The bank's read model: each account's balance and movements, and one row per money
/// movement keyed by its position. The balance update is not idempotent on purpose
/// (`balance = balance + amount`): applying an event twice, or skipping one, shows.
pub struct Balances;

impl eventyr_cqrs::Projection for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    fn event_types(&self) -> &[&str] {
        &["Opened", "Deposited", "Withdrawn", "TransferredOut"]
    }

    fn schema(&self) -> Vec<String> {
        vec![
            "CREATE TABLE accounts (id TEXT PRIMARY KEY, owner TEXT NOT NULL, currency TEXT NOT NULL, \
             balance BIGINT NOT NULL, movements BIGINT NOT NULL)"
                .into(),
            "CREATE TABLE movements (position BIGINT PRIMARY KEY, account TEXT NOT NULL, amount BIGINT NOT NULL)".into(),
        ]
    }

    fn apply(
        &self,
        event: &eventyr_core::RecordedEvent,
    ) -> Result<Vec<eventyr_store::sql::SqlStatement>, eventyr_cqrs::ProjectionError> {
        use eventyr_cqrs::{DomainEvent, ProjectionError};
        use eventyr_store::sql::SqlStatement;
        let account = event
            .stream_id
            .as_str()
            .strip_prefix("account-")
            .unwrap_or(event.stream_id.as_str());
        let decoded = AccountEvent::from_stored(&event.event_type, &event.data)
            .map_err(|e| ProjectionError::new(e.to_string()))?;
        let amount = match decoded {
            AccountEvent::Opened {
                owner, currency, ..
            } => {
                return Ok(vec![SqlStatement::new(
                    "INSERT INTO accounts (id, owner, currency, balance, movements) VALUES ($1, $2, $3, 0, 0)",
                )
                .bind(account)
                .bind(owner)
                .bind(currency)]);
            }
            AccountEvent::Deposited { amount, .. } => amount,
            AccountEvent::Withdrawn { amount, .. }
            | AccountEvent::TransferredOut { amount, .. } => -amount,
        };
        let position =
            i64::try_from(event.position.0).map_err(|e| ProjectionError::new(e.to_string()))?;
        Ok(vec![
            SqlStatement::new("UPDATE accounts SET balance = balance + $2, movements = movements + 1 WHERE id = $1")
                .bind(account)
                .bind(amount),
            SqlStatement::new("INSERT INTO movements (position, account, amount) VALUES ($1, $2, $3)")
                .bind(position)
                .bind(account)
                .bind(amount),
        ])
    }
}
