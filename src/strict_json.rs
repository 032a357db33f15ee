//! Reading JSON text strictly enough for requests, on the socket and the REST API:
//! a key given twice in one object is reported (serde_json keeps the last silently),
//! and text that stops being JSON inside a value names the field it was in.

use std::cell::RefCell;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses JSON text as `serde_json::from_slice` does, and also returns the dotted paths
/// (`to.sms`) of keys given twice in one object, in the order found: serde_json would
/// keep the last silently, and a request must not mean something other than it seems
/// to. Every top-level key given twice is returned (the socket protocol checks `id`),
/// but of those inside a value only the first: each is rebuilt at every level it is
/// nested in, and all of them would cost a hostile line quadratic time and memory.
/// The value keeps each key's first occurrence.
pub fn parse_json(bytes: &[u8]) -> Result<(Value, Vec<String>), JsonError> {
    let failed_at = RefCell::new(Vec::new());
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = CheckedSeed {
        failed_at: &failed_at,
    }
    .deserialize(&mut deserializer)
    .and_then(|checked| deserializer.end().map(|()| checked));
    match parsed {
        Ok(Checked { value, duplicates }) => Ok((value, duplicates)),
        Err(error) => {
            let mut path = failed_at.into_inner();
            path.reverse();
            Err(JsonError {
                at: (!path.is_empty()).then(|| path.join(".")),
                error,
            })
        }
    }
}

/// Text that is not JSON, and the dotted path of the value where it stopped being JSON
/// (a number beyond a double in `ttl_secs`, say), so that the answer can name the field.
#[derive(Debug)]
pub struct JsonError {
    at: Option<String>,
    error: serde_json::Error,
}

impl JsonError {
    /// otpd's words for a fault serde_json describes in terms of its own parsing, not
    /// the request:
    /// - a `\u` escape of half a UTF-16 surrogate pair ("lone leading surrogate",
    ///   "unexpected end of hex escape"): JSON's grammar allows it, but it is no
    ///   character (RFC 8259 §8.2);
    /// - bytes in a string that are not UTF-8 ("invalid unicode code point", as if an
    ///   escape were at fault).
    fn own_wording(&self) -> Option<&'static str> {
        let message = self.error.to_string();
        if message.starts_with("lone leading surrogate in hex escape")
            || message.starts_with("unexpected end of hex escape")
        {
            Some(
                "a \\u escape of a lone UTF-16 surrogate (\\ud800 to \\udfff), which is no \
                 character; expected a high-low pair (\\ud83d\\ude00) or UTF-8 text",
            )
        } else if message.starts_with("invalid unicode code point") {
            Some("bytes that are not UTF-8 text, which JSON text must be")
        } else {
            None
        }
    }
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        if let Some(path) = &self.at {
            write!(f, "{path}: ")?;
        }
        match self.own_wording() {
            Some(wording) => write!(
                f,
                "{wording}, at line {} column {}",
                self.error.line(),
                self.error.column()
            ),
            None => self.error.fmt(f),
        }
    }
}

/// A JSON value and the paths of its repeated keys, as [`parse_json`] returns.
struct Checked {
    value: Value,
    duplicates: Vec<String>,
}

impl Checked {
    fn plain(value: Value) -> Self {
        Self {
            value,
            duplicates: Vec::new(),
        }
    }
}

/// Reads one JSON value into a [`Checked`]. When the text stops being JSON inside the
/// value, each object and array it is nested in adds its key or index to `failed_at`,
/// innermost first.
#[derive(Clone, Copy)]
struct CheckedSeed<'p> {
    failed_at: &'p RefCell<Vec<String>>,
}

impl<'de> DeserializeSeed<'de> for CheckedSeed<'_> {
    type Value = Checked;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// Builds a [`Value`] as serde_json's own visitor does, noting repeated keys.
impl<'de> Visitor<'de> for CheckedSeed<'_> {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Checked, E> {
        Ok(Checked::plain(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Checked, E> {
        Ok(Checked::plain(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Checked, E> {
        Ok(Checked::plain(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> Result<Checked, E> {
        Ok(Checked::plain(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Checked, E> {
        Ok(Checked::plain(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked::plain(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Checked, A::Error> {
        let (mut values, mut duplicates) = (Vec::new(), Vec::new());
        loop {
            let index = values.len();
            let item = items
                .next_element_seed(self)
                .inspect_err(|_| self.failed_at.borrow_mut().push(index.to_string()))?;
            let Some(item) = item else { break };
            if duplicates.is_empty() {
                duplicates.extend(nested(index, item.duplicates));
            }
            values.push(item.value);
        }
        Ok(Checked {
            value: Value::Array(values),
            duplicates,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Checked, A::Error> {
        let (mut object, mut duplicates) = (Map::new(), Vec::new());
        let mut found_nested = false;
        while let Some(key) = entries.next_key::<String>()? {
            let entry = entries
                .next_value_seed(self)
                .inspect_err(|_| self.failed_at.borrow_mut().push(key.clone()))?;
            if !found_nested && let Some(path) = nested(&key, entry.duplicates) {
                found_nested = true;
                duplicates.push(path);
            }
            if object.contains_key(&key) {
                duplicates.push(key);
            } else {
                object.insert(key, entry.value);
            }
        }
        Ok(Checked {
            value: Value::Object(object),
            duplicates,
        })
    }
}

/// The first of the repeated keys found in the value at `at`, as a path from here: the
/// one a value nested in another passes up.
fn nested(at: impl std::fmt::Display, duplicates: Vec<String>) -> Option<String> {
    let first = duplicates.into_iter().next()?;
    Some(format!("{at}.{first}"))
}
