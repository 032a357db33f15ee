//! The layout of the trees, named by a mark in the metadata tree, and the move of a
//! database from the layout before.
//!
//! Layout 1 keyed each tree by the names themselves: `tokens` by the token,
//! `references` by the delivery id (its values the token), and `expiry`, `recipients`
//! and `failovers` by a time and then the token, the recipient or the delivery id.
//! Layout 2 (today's) keys them by the [short keys](super::short_keys) of those
//! names, under a hash key drawn for the database and kept in the metadata tree, in
//! trees named anew (`tokens-2` …).
//!
//! The move writes the new trees beside the old and changes the mark only once they
//! are durable, so a crash during it leaves layout 1 whole: the next start empties what
//! the move wrote and moves again. The old trees are dropped after the mark (at the
//! next start if a crash came first), and their names never used again
//! ([`Database::drop_tree`]).

use std::path::Path;
use std::time::Duration;

use super::kv::{Database, Tree};
use super::short_keys::KeyHasher;
use super::timed::{split_timed_key, timed_key};
use crate::store::StoreError;

/// Key in the metadata tree ([`Database::meta`]) naming the layout of the other trees.
pub(super) const LAYOUT_KEY: &[u8] = b"layout";
/// Key in the metadata tree holding the hash key of the short keys ([`KeyHasher`]).
const KEY_SEED_KEY: &[u8] = b"key-seed";
/// The layout this build reads and writes.
const LAYOUT: &[u8] = b"2";
/// The layout before, which [`open`] moves from.
const LAYOUT_1: &[u8] = b"1";

/// How many entries the move writes between two reports of progress to systemd, each
/// asking for 30 s more (about 0.2 s of work on fjall, 1.3 s on sled).
const PROGRESS_EVERY: u64 = 100_000;

/// Today's trees, by name.
pub(super) const TOKENS: &str = "tokens-2";
pub(super) const EXPIRY: &str = "expiry-2";
pub(super) const RECIPIENTS: &str = "recipients-2";
pub(super) const REFERENCES: &str = "references-2";
pub(super) const FAILOVERS: &str = "failovers-2";

/// How an entry of a layout-1 tree is keyed.
#[derive(Clone, Copy)]
pub(super) enum Keyed {
    /// By the name: the token's record.
    Name,
    /// By the name, and its value is a name too: a delivery id naming its token.
    NameToName,
    /// By a time and then the name.
    Timed,
}

/// Each layout-1 tree, how it is keyed, and the tree it moves to.
pub(super) const LAYOUT_1_TREES: [(&str, Keyed, &str); 5] = [
    ("tokens", Keyed::Name, TOKENS),
    ("expiry", Keyed::Timed, EXPIRY),
    ("recipients", Keyed::Timed, RECIPIENTS),
    ("references", Keyed::NameToName, REFERENCES),
    ("failovers", Keyed::Timed, FAILOVERS),
];

/// Makes sure the database is in today's layout, marking a new one and moving one in
/// layout 1; refuses any other. A database that opens empty is marked as new only if
/// it `may_be_new`: otherwise its files were there but their contents are lost (sled
/// recovers its log up to the first damaged block, which can be the first), and
/// starting on it would answer 404 to every code issued. Returns the hasher of its
/// keys. `path` names the database in messages.
pub(super) fn open<D: Database>(
    db: &D,
    meta: &D::Tree,
    path: &Path,
    may_be_new: bool,
) -> Result<KeyHasher, StoreError> {
    let refuse = |why: &str| {
        Err(StoreError::Database(format!(
            "{}: {why}; restore it from a backup, or move the directory away to start \
             afresh",
            path.display()
        )))
    };
    match (meta.get(LAYOUT_KEY)?.as_deref(), db.is_fresh()?) {
        (Some(LAYOUT), _) => {}
        (Some(LAYOUT_1), _) => move_from_layout_1(db, meta, path)?,
        // Durable before any tree exists: fjall creates a partition on disk at once,
        // outside its journal, so a crash must not leave trees without the mark.
        (None, true) if may_be_new => {
            meta.insert(KEY_SEED_KEY, &KeyHasher::draw_seed())?;
            meta.insert(LAYOUT_KEY, LAYOUT)?;
            db.flush()?;
        }
        (None, true) => {
            return refuse(&format!(
                "holds {} database files, but they open empty, without even otpd's \
                 layout mark: damaged or emptied, so the codes they held are lost",
                D::ENGINE
            ));
        }
        _ => {
            return refuse(
                "has another layout than this build's, or none (an otpd development \
                 build's, or damaged)",
            );
        }
    }
    for (old, _, _) in LAYOUT_1_TREES {
        if db.has_tree(old) {
            db.drop_tree(old)?;
        }
    }
    let seed = meta.get(KEY_SEED_KEY)?;
    let seed = (seed.as_deref().and_then(|seed| seed.try_into().ok()))
        .ok_or_else(|| StoreError::Corrupt(format!("{}: no key-seed", path.display())))?;
    Ok(KeyHasher::new(seed))
}

/// Writes every entry of the layout-1 trees into today's under a new hash key, makes
/// that durable, and then marks the database as today's.
fn move_from_layout_1<D: Database>(db: &D, meta: &D::Tree, path: &Path) -> Result<(), StoreError> {
    for (_, _, new) in LAYOUT_1_TREES {
        clear(&db.open_tree(new)?)?; // written by a move that a crash cut short
    }
    tracing::info!(path = %path.display(), "moving the database to layout 2 (short keys): \
        about 9 s for 1 M codes, and the daemon is ready once it is done");
    let seed = KeyHasher::draw_seed();
    meta.insert(KEY_SEED_KEY, &seed)?;
    let keys = KeyHasher::new(&seed);
    let short = |name: &[u8]| keys.short(name).to_vec();
    let mut entries = 0u64;
    for (old, keyed, new) in LAYOUT_1_TREES {
        let (old, new) = (db.open_tree(old)?, db.open_tree(new)?);
        for entry in old.entries() {
            let (key, value) = entry?;
            let (key, value) = match keyed {
                Keyed::Name => (short(&key), value.to_vec()),
                Keyed::NameToName => (short(&key), short(&value)),
                Keyed::Timed => match split_timed_key(&key) {
                    Some((at, name)) => (timed_key(at, &short(name)), value.to_vec()),
                    None => continue, // never written; the janitor would drop it
                },
            };
            new.insert(&key, &value)?;
            entries += 1;
            if entries.is_multiple_of(PROGRESS_EVERY) {
                let status = format!("moving the database to layout 2: {entries} entries");
                crate::systemd::still_starting(&status, Duration::from_secs(30));
            }
        }
    }
    db.flush()?;
    meta.insert(LAYOUT_KEY, LAYOUT)?;
    db.flush()?;
    // The move filled the memtables: written out, a daemon that moved 1 M codes holds
    // 98 MiB instead of 115 (57 at its next start). Durable already, so a write-out
    // cut short costs only memory.
    if let Err(error) = db.write_out(super::WRITE_OUT_WITHIN) {
        tracing::warn!(%error, "the moved trees stay in memory until they are written out");
    }
    tracing::info!(path = %path.display(), entries, "database moved to layout 2 (short keys)");
    Ok(())
}

/// Empties a tree key by key. A tree a cut-short move wrote is emptied this way, not
/// dropped and made again under its name ([`Database::drop_tree`] says why not).
fn clear<T: Tree>(tree: &T) -> Result<(), StoreError> {
    for entry in tree.entries() {
        tree.remove(&entry?.0)?;
    }
    Ok(())
}
