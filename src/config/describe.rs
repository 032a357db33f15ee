//! What a TOML error says, without what the file holds: the line and column, the key,
//! and the kind of value, never the value or the source line (either may be a secret).

/// "line L, column C: what is wrong", without the quoted source line that the toml
/// crate's own message carries: that line may hold a secret (a misspelt
/// `webhook_signature_secret`, a Redis URL with its password, or the first line of a
/// key file given as the config by mistake). A key given twice is named (the span is
/// the key).
pub(super) fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = match (error.message().trim_end(), error.span()) {
        ("duplicate key", Some(key)) => {
            format!("`{}` given twice", text.get(key).unwrap_or("a key"))
        }
        (message, _) => message.to_owned(),
    };
    at_line(text, error.span(), &message)
}

/// `message` behind the line and column where `span` starts.
fn at_line(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let Some(span) = span else {
        return message.to_owned();
    };
    let start = text.floor_char_boundary(span.start.min(text.len()));
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
}

/// A value of the wrong type or range: [`describe_toml_error`] with the key's full
/// name, and without the value serde quotes ("invalid type: string \"redis://u:pw@h\",
/// expected a sequence"): a secret put under the wrong key, or in the wrong form,
/// must not reach the journal.
pub(super) fn describe_value_error(
    text: &str,
    error: serde_path_to_error::Error<toml::de::Error>,
) -> String {
    let key = error.path().to_string();
    let inner = error.into_inner();
    let described = at_line(
        text,
        inner.span(),
        &without_value(inner.message().trim_end()),
    );
    match key.as_str() {
        "." => described,
        _ => format!("{described} (key `{key}`)"),
    }
}

/// The Rust integer types serde names in "expected u64".
const INTEGER_TYPES: [&str; 12] = [
    "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize",
];

/// serde's `invalid type: <kind> <value>, expected <what>` (or `invalid value: …`)
/// with the kind of value only, and with Rust's type names in words: a whole number,
/// or, for an integer outside its type, which way it is wrong (told by its sign, as
/// the value itself is not shown). "unknown variant `<value>`, expected …" (a word
/// that is not one of a key's choices) loses the value too.
fn without_value(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let expected = rest
            .rsplit_once(", expected ")
            .map(|(_, expected)| format!(", expected {expected}"))
            .unwrap_or_default();
        return format!("unknown value{expected}");
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((found, expected)) = rest.rsplit_once(", expected ")
        {
            let kind = found.split(['`', '"']).next().unwrap_or(found).trim_end();
            let integer_type = INTEGER_TYPES.contains(&expected);
            if kind == "integer" && integer_type {
                return match (found.starts_with("integer `-"), expected.starts_with('u')) {
                    (true, true) => "must not be negative",
                    (true, false) => "too small",
                    (false, _) => "too large",
                }
                .to_owned();
            }
            let expected = match expected.strip_prefix("struct ") {
                Some(_) => "a table",
                None if integer_type => "a whole number",
                None => expected,
            };
            return format!("{prefix}{kind}, expected {expected}");
        }
    }
    message.to_owned()
}
