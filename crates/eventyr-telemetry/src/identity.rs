//! The headers that say who a request between Eventyr's processes is from — like the
//! trace headers, a convention of every hop: the gateway sets them (after dropping a
//! client's own), the services read them (`eventyr_http::caller`), and nothing else
//! may.

/// The internal credential: the secret the components of one system share.
pub const X_EVENTYR_CREDENTIAL: &str = "x-eventyr-credential";
/// The user a request is for (the token's subject).
pub const X_USER_ID: &str = "x-user-id";
/// The user's roles, comma-separated.
pub const X_USER_ROLES: &str = "x-user-roles";
/// The customer id the user owns.
pub const X_CUSTOMER_ID: &str = "x-customer-id";
/// A request the gateway passed on for nobody in particular (a public route): it
/// carries the credential, but is no component of the system.
pub const X_EVENTYR_ANONYMOUS: &str = "x-eventyr-anonymous";
/// Every one of them.
pub const HEADERS: [&str; 5] = [
    X_EVENTYR_CREDENTIAL,
    X_USER_ID,
    X_USER_ROLES,
    X_CUSTOMER_ID,
    X_EVENTYR_ANONYMOUS,
];
