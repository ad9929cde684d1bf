//! The one rule for cluster names and KME, SAE, entropy-server and replica IDs, and the
//! [`Name`] type that can only hold a name that passed it.
//!
//! Names become file names (`<id>.pem`), URI path segments and map keys at every site, so
//! a value that could escape a directory (`/`, `..`) or need escaping must never get in:
//! parse, don't validate.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{PkiError, Result};

/// Longest accepted cluster name or ID; keeps file names and URIs sane.
pub const MAX_NAME_LEN: usize = 64;

/// A cluster name or an entity ID: 1–64 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// It serialises as the plain string and deserialising validates, so a config file or a
/// peer message with a bad name is refused where it is read. Ordering, equality and
/// hashing are those of the string, so `Name`-keyed maps can be searched with a `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Validates `value` as a name; `what` ("KME ID", "SAE ID", …) goes into the error.
    pub fn new(what: &'static str, value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        validate_name(what, &value)?;
        Ok(Name(value))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Shown as the quoted string, so messages that print a name with `{:?}` read the same.
impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        Name::new("name", s)
    }
}

impl TryFrom<String> for Name {
    type Error = PkiError;

    fn try_from(value: String) -> Result<Self> {
        Name::new("name", value)
    }
}

impl TryFrom<&str> for Name {
    type Error = PkiError;

    fn try_from(value: &str) -> Result<Self> {
        Name::new("name", value)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        *self == other.0
    }
}

/// Checks a cluster name or ID: 1–64 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// Prefer [`Name::new`], which keeps the proof; this is for callers that only check.
pub fn validate_name(what: &'static str, value: &str) -> Result<()> {
    let bad = |reason| {
        Err(PkiError::InvalidName {
            what,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > MAX_NAME_LEN {
        return bad("longer than 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed");
    }
    if value == "." || value == ".." {
        return bad("must not be '.' or '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVALID: [&str; 8] = ["", ".", "..", "a/b", "a b", "é", "a\\b", "a%2e"];

    #[test]
    fn valid_names_are_kept_as_given() {
        for ok in ["A-z_0.9", "a..b", "_-.", "x", &"a".repeat(MAX_NAME_LEN)] {
            let name = Name::new("ID", ok).unwrap();
            assert_eq!(name.as_str(), ok);
            assert_eq!(&*name, ok);
            assert_eq!(name.to_string(), ok);
            assert_eq!(format!("{name:?}"), format!("{ok:?}"));
            assert_eq!(ok.parse::<Name>().unwrap(), name);
            assert_eq!(name, ok);
        }
    }

    #[test]
    fn each_invalid_class_is_refused_naming_what() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in INVALID.iter().copied().chain([long.as_str()]) {
            let err = Name::new("SAE ID", bad).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidName { what: "SAE ID", .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().starts_with("invalid SAE ID"), "{err}");
            assert!(bad.parse::<Name>().is_err(), "{bad:?} parsed");
            assert!(Name::try_from(bad.to_owned()).is_err(), "{bad:?} converted");
        }
    }

    #[test]
    fn serde_is_the_plain_string() {
        let name = Name::new("ID", "kme-a").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"kme-a\"");
        assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), name);
    }

    #[test]
    fn serde_refuses_invalid_names() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in INVALID.iter().copied().chain([long.as_str()]) {
            let json = serde_json::to_string(bad).unwrap();
            let err = serde_json::from_str::<Name>(&json).unwrap_err();
            assert!(err.to_string().contains("invalid name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn maps_keyed_by_name_are_searched_by_str() {
        let mut map = std::collections::BTreeMap::new();
        map.insert(Name::new("ID", "b").unwrap(), 2);
        map.insert(Name::new("ID", "a").unwrap(), 1);
        assert_eq!(map.get("a"), Some(&1));
        assert_eq!(map.keys().next().unwrap(), "a");
    }
}
