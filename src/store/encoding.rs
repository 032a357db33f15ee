//! Stored values: one version byte, then the postcard encoding of the record.
//!
//! The version byte lets a later release read records written by this one. A record
//! may carry an optional second one behind it ([`encode_with_extra`]): a reader that
//! does not look for it, or a record written without it, reads as before.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// The format every record is written in today.
const FORMAT_V1: u8 = 1;

/// Room for a typical token record and what rides behind it, so that encoding one
/// does not grow the buffer five times over (the store copies the bytes anyway).
const TYPICAL_RECORD_BYTES: usize = 256;

/// Encodes a record behind the version byte.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(TYPICAL_RECORD_BYTES);
    bytes.push(FORMAT_V1);
    // postcard only fails on writers that run out of room; a Vec never does.
    postcard::to_extend(record, bytes).expect("postcard encodes into a Vec")
}

/// Encodes a record and, if given, an `extra` one right behind it.
pub fn encode_with_extra<T: Serialize, U: Serialize>(record: &T, extra: Option<&U>) -> Vec<u8> {
    let bytes = encode(record);
    match extra {
        Some(extra) => postcard::to_extend(extra, bytes).expect("postcard encodes into a Vec"),
        None => bytes,
    }
}

/// Decodes a record written by [`encode`] (or [`encode_with_extra`], ignoring the extra).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(body(bytes)?).map_err(corrupt)
}

/// Decodes a record written by [`encode_with_extra`] (or by [`encode`]: no extra).
pub fn decode_with_extra<T: DeserializeOwned, U: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, Option<U>), StoreError> {
    let (record, rest) = postcard::take_from_bytes(body(bytes)?).map_err(corrupt)?;
    let extra = if rest.is_empty() {
        None
    } else {
        Some(postcard::from_bytes(rest).map_err(corrupt)?)
    };
    Ok((record, extra))
}

/// The postcard bytes behind the version byte.
fn body(bytes: &[u8]) -> Result<&[u8], StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => Ok(body),
        Some((version, _)) => Err(StoreError::Corrupt(format!(
            "unknown record format {version}"
        ))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

fn corrupt(error: postcard::Error) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Channel, CodeRecord};

    #[test]
    fn round_trip_and_refusals() {
        let record = CodeRecord::new(1, 2, vec![Channel::Messenger, Channel::Sms]);
        let bytes = encode(&record);
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(decode::<CodeRecord>(&bytes).unwrap(), record);
        assert!(decode::<CodeRecord>(&[]).is_err());
        assert!(decode::<CodeRecord>(&[9, 0]).is_err());
        assert!(decode::<CodeRecord>(&bytes[..2]).is_err());
    }

    #[test]
    fn an_extra_record_rides_behind_and_is_optional() {
        let record = CodeRecord::new(1, 2, vec![Channel::Sms]);
        let extra = CodeRecord::new(3, 4, vec![Channel::Messenger]);
        let both = encode_with_extra(&record, Some(&extra));
        assert_eq!(decode::<CodeRecord>(&both).unwrap(), record);
        let (first, second) = decode_with_extra::<CodeRecord, CodeRecord>(&both).unwrap();
        assert_eq!((first, second), (record.clone(), Some(extra)));
        let alone = encode_with_extra::<_, CodeRecord>(&record, None);
        assert_eq!(alone, encode(&record));
        let read = decode_with_extra::<CodeRecord, CodeRecord>(&alone).unwrap();
        assert_eq!(read, (record, None));
        assert!(decode_with_extra::<CodeRecord, CodeRecord>(&both[..both.len() - 1]).is_err());
    }
}
