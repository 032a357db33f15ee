//! Stored values: one version byte, then the postcard encoding of the record.
//!
//! The version byte lets a later release read records written by this one.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// The format every record is written in today.
const FORMAT_V1: u8 = 1;

/// Encodes a record behind the version byte.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // postcard only fails on writers that run out of room; a Vec never does.
    postcard::to_extend(record, vec![FORMAT_V1]).expect("postcard encodes into a Vec")
}

/// Decodes a record written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            postcard::from_bytes(body).map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        Some((version, _)) => Err(StoreError::Corrupt(format!(
            "unknown record format {version}"
        ))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
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
}
