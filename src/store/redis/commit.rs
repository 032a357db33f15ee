//! The optimistic commit every change ends in: the keys it read, checked against what
//! it read, and its writes, applied by one Lua script, all or nothing.

use std::sync::LazyLock;

use redis::{RedisError, Script};

use super::connection::Connection;
use super::{Read, RedisStore};
use crate::rules::Millis;
use crate::store::StoreError;

/// Writes a planned change only if every checked key still holds the value it was
/// planned from. Per key, three arguments: the expected value (`''` absent, `'*'` not
/// checked), the new value (`''` delete, `'='` unchanged) and the expiry in unix ms,
/// which only ever moves later. Checks all keys before writing any: all or nothing.
pub(super) const COMMIT: &str = r"
for i, key in ipairs(KEYS) do
  local expected = ARGV[3 * i - 2]
  if expected ~= '*' and (redis.call('GET', key) or '') ~= expected then
    return 0
  end
end
for i, key in ipairs(KEYS) do
  local new = ARGV[3 * i - 1]
  if new == '' then
    redis.call('DEL', key)
  elseif new ~= '=' then
    local at = ARGV[3 * i]
    local old = redis.call('PEXPIRETIME', key)
    if old > tonumber(at) then
      at = string.format('%d', old)
    end
    redis.call('SET', key, new, 'PXAT', at)
  end
end
return 1
";

static COMMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(COMMIT));

/// One optimistic commit for [`COMMIT`]: keys checked against what was read, and writes.
#[derive(Default)]
pub(super) struct Commit {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Commit {
    fn push(&mut self, key: &str, expected: &[u8], new: &[u8], expire_at: Millis) -> &mut Self {
        self.keys.push(key.to_owned());
        self.args.push(expected.to_vec());
        self.args.push(new.to_vec());
        self.args.push(expire_at.max(1).to_string().into_bytes());
        self
    }

    /// The commit goes through only if `key` still holds `read`.
    pub(super) fn expect(&mut self, key: &str, read: &Read) -> &mut Self {
        self.push(key, read.as_deref().unwrap_or(b""), b"=", 0)
    }

    /// Writes `value`, expiring at `expire_at` (or later, if it already did).
    pub(super) fn set(&mut self, key: &str, value: &[u8], expire_at: Millis) -> &mut Self {
        self.push(key, b"*", value, expire_at)
    }

    pub(super) fn delete(&mut self, key: &str) -> &mut Self {
        self.push(key, b"*", b"", 0)
    }
}

impl RedisStore {
    /// Runs a commit; false when a key changed since it was read.
    pub(super) async fn apply(
        &self,
        conn: &mut Connection,
        commit: &Commit,
    ) -> Result<bool, StoreError> {
        self.run_commit(conn, commit)
            .await
            .map_err(|e| self.failure(e))
    }

    /// [`Self::apply`] with Redis's own error.
    pub(super) async fn run_commit(
        &self,
        conn: &mut Connection,
        commit: &Commit,
    ) -> Result<bool, RedisError> {
        let mut invocation = COMMIT_SCRIPT.prepare_invoke();
        for key in &commit.keys {
            invocation.key(key.as_str());
        }
        for arg in &commit.args {
            invocation.arg(arg.as_slice());
        }
        let applied: i64 = invocation.invoke_async(conn).await?;
        Ok(applied == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_lists_three_arguments_per_key() {
        let mut commit = Commit::default();
        commit
            .expect("a", &None)
            .expect("b", &Some(vec![1, 2]))
            .set("b", &[3], 5)
            .delete("c");
        assert_eq!(commit.keys, ["a", "b", "b", "c"]);
        let args: Vec<&[u8]> = commit.args.iter().map(Vec::as_slice).collect();
        assert_eq!(
            args,
            [
                &b""[..],
                b"=",
                b"1",
                &[1, 2],
                b"=",
                b"1",
                b"*",
                &[3],
                b"5",
                b"*",
                b"",
                b"1",
            ]
        );
    }
}
