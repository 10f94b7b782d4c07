//! Comparing the live tree with a fresh listing's, path by path: each directory's entries
//! are merged from two name-ordered queries, one row at a time, and only what differs
//! becomes a change. An unchanged container costs reads and no writes; memory holds one
//! stack of directories and the list of changes.

use super::{child, read_row, Row, Scope, COLS, DIR};
use crate::index::IndexResult;
use rusqlite::Connection;

pub(super) enum Change {
    Update {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
        fresh: Row,
    },
    Add {
        parent: u64,
        name: Vec<u8>,
        fresh: u64,
    },
    Remove {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
}

/// Compares one name on both sides; directories on both sides go on `dirs` to descend.
fn diff_entry(
    parent: u64,
    name: Vec<u8>,
    l: Option<Row>,
    f: Option<Row>,
    dirs: &mut Vec<(u64, Option<u64>)>,
    out: &mut Vec<Change>,
) {
    match (l, f) {
        (Some(l), Some(f)) if l.kind == f.kind => {
            if l.kind == DIR {
                dirs.push((l.ino, Some(f.ino)));
            }
            if l.differs(&f) {
                out.push(Change::Update {
                    parent,
                    name,
                    ino: l.ino,
                    fresh: f,
                });
            }
        }
        (Some(l), Some(f)) => {
            out.push(Change::Remove {
                parent,
                name: name.clone(),
                ino: l.ino,
            });
            out.push(Change::Add {
                parent,
                name,
                fresh: f.ino,
            });
        }
        (Some(l), None) => out.push(Change::Remove {
            parent,
            name,
            ino: l.ino,
        }),
        (None, Some(f)) => out.push(Change::Add {
            parent,
            name,
            fresh: f.ino,
        }),
        (None, None) => {}
    }
}

/// The changes that make the live tree under `start` look like the fresh one. Each
/// directory's entries are merged from two name-ordered queries, one row at a time.
pub(super) fn diff(
    live: &Connection,
    fresh: &Connection,
    scope: &Scope,
    (ldir, fdir): (u64, Option<u64>),
) -> IndexResult<Vec<Change>> {
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    match scope {
        Scope::Dir(_) => dirs.push((ldir, fdir)),
        Scope::Entry(_, name) => {
            let n = name.as_bytes();
            let f = match fdir {
                Some(fd) => child(fresh, fd, n)?,
                None => None,
            };
            diff_entry(
                ldir,
                n.to_vec(),
                child(live, ldir, n)?,
                f,
                &mut dirs,
                &mut out,
            );
        }
    }
    let sql = format!(
        "SELECT d.name, {COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 ORDER BY d.name"
    );
    while let Some((ld, fd)) = dirs.pop() {
        let mut lst = live.prepare(&sql)?;
        let mut fst = fresh.prepare(&sql)?;
        let read = |r: &rusqlite::Row<'_>| Ok((r.get::<_, Vec<u8>>(0)?, read_row(r, 1)?));
        let mut lrows = lst.query_map([ld as i64], read)?.peekable();
        let mut frows = fst
            .query_map([fd.map(|f| f as i64).unwrap_or(-1)], read)?
            .peekable();
        loop {
            let order = match (lrows.peek(), frows.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Ok((a, _))), Some(Ok((b, _)))) => a.cmp(b),
                // An error is taken (and returned) below.
                (Some(Err(_)), _) => std::cmp::Ordering::Less,
                (_, Some(Err(_))) => std::cmp::Ordering::Greater,
            };
            let (name, l, f) = match order {
                std::cmp::Ordering::Less => {
                    let (n, l) = lrows.next().expect("peeked")?;
                    (n, Some(l), None)
                }
                std::cmp::Ordering::Greater => {
                    let (n, f) = frows.next().expect("peeked")?;
                    (n, None, Some(f))
                }
                std::cmp::Ordering::Equal => {
                    let (n, l) = lrows.next().expect("peeked")?;
                    let (_, f) = frows.next().expect("peeked")?;
                    (n, Some(l), Some(f))
                }
            };
            diff_entry(ld, name, l, f, &mut dirs, &mut out);
        }
    }
    Ok(out)
}
