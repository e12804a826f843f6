//! [`Json`]: an event's data as the exact JSON text it was written with.
//!
//! The store keeps data as bytes and never re-parses them on the read path: a consumer
//! decodes them once, into its own type. Serialising a [`Json`] embeds the text
//! verbatim, so nothing (key order, number spelling) changes between write and read.

use std::fmt;

use bytes::Bytes;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::validate::ValidationError;

/// A JSON document held as its UTF-8 text. Made only from text that parses as JSON,
/// except through [`Json::from_stored`], which backends use for bytes they validated on
/// write.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Json(Bytes);

impl Json {
    /// Validates `bytes` as one JSON document.
    pub fn from_slice(bytes: impl Into<Bytes>) -> Result<Self, ValidationError> {
        let bytes = bytes.into();
        serde_json::from_slice::<IgnoredAny>(&bytes).map_err(|e| ValidationError::InvalidJson {
            field: "data",
            message: e.to_string(),
        })?;
        Ok(Self(bytes))
    }

    /// Serialises a value. Fails only for values serde_json cannot write (maps with
    /// non-string keys).
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, ValidationError> {
        let bytes = serde_json::to_vec(value).map_err(|e| ValidationError::InvalidJson {
            field: "data",
            message: e.to_string(),
        })?;
        Ok(Self(Bytes::from(bytes)))
    }

    /// Wraps bytes that were validated as JSON when they were written. Storage
    /// backends use it on their read path so that reads do not parse.
    pub fn from_stored(bytes: impl Into<Bytes>) -> Self {
        Self(bytes.into())
    }

    /// Decodes into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }

    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        self.decode()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text as a string slice, if the bytes are UTF-8 (always, unless a backend
    /// handed over corrupt bytes through [`Json::from_stored`]).
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    fn to_raw(&self) -> Result<Box<RawValue>, String> {
        let text = self.as_str().ok_or("event data is not UTF-8")?;
        RawValue::from_string(text.to_owned()).map_err(|e| e.to_string())
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(text) => write!(f, "Json({text})"),
            None => write!(f, "Json(<{} invalid bytes>)", self.0.len()),
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_raw()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Ok(Self(Bytes::from(String::from(Box::<str>::from(raw)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_json() {
        assert!(Json::from_slice(&b"{\"a\":"[..]).is_err());
        assert!(Json::from_slice(&b"{} {}"[..]).is_err());
        assert!(Json::from_slice(&b"\xff"[..]).is_err());
        assert!(Json::from_slice(&b" [1, 2.50, \"\xc3\xa9\"] "[..]).is_ok());
    }

    #[test]
    fn text_survives_a_round_trip_verbatim() {
        let json = Json::from_slice(&br#"{"b":1,"a":2.50}"#[..]).unwrap();
        let outer = serde_json::to_string(&serde_json::json!({ "x": 1 })).unwrap();
        assert_eq!(outer, r#"{"x":1}"#);
        let wrapped = serde_json::to_string(&vec![json.clone()]).unwrap();
        assert_eq!(wrapped, r#"[{"b":1,"a":2.50}]"#);
        let back: Vec<Json> = serde_json::from_str(&wrapped).unwrap();
        assert_eq!(back[0], json);
    }
}
