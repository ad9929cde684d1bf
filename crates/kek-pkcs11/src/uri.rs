//! `pkcs11:` URIs (RFC 7512) naming the token and the key object: only the parts a KEK
//! needs, so that a typo is refused rather than silently matching another key.

use std::fmt;

/// The token (by label) and secret-key object (by label) that hold a site KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekUri {
    token: String,
    object: String,
}

impl KekUri {
    /// Parses `pkcs11:token=<label>;object=<label>` (values percent-encoded as RFC 7512
    /// allows; `type=secret-key` may be given). Anything else, including a PIN in the URI,
    /// is refused: the PIN comes from the site file or the environment, never a URI that ends
    /// up in logs.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("pkcs11:")
            .ok_or("a PKCS#11 URI starts with pkcs11:")?;
        if rest.contains('?') {
            return Err(
                "query attributes (such as pin-value or module-path) are not accepted; \
                        set the module and PIN in [store] or the environment"
                    .into(),
            );
        }
        let (mut token, mut object) = (None, None);
        for part in rest.split(';').filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not name=value"))?;
            let value = decode(value)?;
            match name {
                "token" => token = Some(value),
                "object" => object = Some(value),
                "type" if value == "secret-key" => {}
                "type" => return Err(format!("type={value}: a KEK is a secret-key")),
                other => return Err(format!("unsupported attribute {other:?}")),
            }
        }
        match (token, object) {
            (Some(token), Some(object)) if !token.is_empty() && !object.is_empty() => {
                Ok(KekUri { token, object })
            }
            _ => Err("both token=<label> and object=<label> are required".into()),
        }
    }

    /// The token's label.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The key object's label.
    pub fn object(&self) -> &str {
        &self.object
    }
}

impl fmt::Display for KekUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pkcs11:token={};object={}",
            encode(&self.token),
            encode(&self.object)
        )
    }
}

fn decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {value:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} is not UTF-8"))
}

fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        let uri = KekUri::parse("pkcs11:token=site%20A;object=kek;type=secret-key").unwrap();
        assert_eq!((uri.token(), uri.object()), ("site A", "kek"));
        assert_eq!(uri.to_string(), "pkcs11:token=site%20A;object=kek");
        assert_eq!(KekUri::parse(&uri.to_string()).unwrap(), uri);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for bad in [
            "token=a;object=b",
            "pkcs11:token=a",
            "pkcs11:object=b",
            "pkcs11:token=;object=b",
            "pkcs11:token=a;object=b?pin-value=1234",
            "pkcs11:token=a;object=b;type=private",
            "pkcs11:token=a;object=b;serial=1",
            "pkcs11:token=a%2;object=b",
        ] {
            assert!(KekUri::parse(bad).is_err(), "{bad}");
        }
    }
}
