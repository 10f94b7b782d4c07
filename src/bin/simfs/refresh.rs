//! `simfs refresh MOUNTPOINT [PATH]`: make others' changes visible on a serving mount now.
//!
//! The daemon does the listing (`simfs::refresh`); this command only names the subtree, over
//! the control socket, and prints what changed once the change is visible. PATH need not
//! exist on the mount: refreshing where a new file is expected is how it appears.

use simfs::protocol::{request, Event, Request};
use std::path::{Component, Path};
use std::process::ExitCode;

/// PATH as text relative to the mount's root: an absolute path must lie below `mountpoint`.
fn relative(mountpoint: &Path, path: &Path) -> Result<String, String> {
    let rel = if path.is_absolute() {
        let mp = std::fs::canonicalize(mountpoint)
            .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
        path.strip_prefix(&mp)
            .or_else(|_| path.strip_prefix(mountpoint))
            .map_err(|_| {
                format!(
                    "{} is not below the mount point {}",
                    path.display(),
                    mp.display()
                )
            })?
            .to_path_buf()
    } else {
        path.to_path_buf()
    };
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(
                p.to_str()
                    .ok_or_else(|| format!("{}: not a UTF-8 path", path.display()))?,
            ),
            Component::CurDir => {}
            _ => return Err(format!("{}: '..' is not allowed", path.display())),
        }
    }
    Ok(parts.join("/"))
}

pub fn refresh(mountpoint: &Path, path: Option<&Path>) -> ExitCode {
    let run = || -> Result<String, String> {
        let (state_dir, base) = crate::stage::mount_of(mountpoint)?;
        let sub = match path {
            Some(p) => relative(mountpoint, p)?,
            None => String::new(),
        };
        let full = [base.as_str(), sub.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
        for e in request(&state_dir, &Request::Refresh { path: full.clone() })? {
            match e? {
                Event::Refreshed(r) => {
                    return Ok(format!(
                        "refreshed /{full}: {} added, {} changed, {} removed, {} kept (local changes not yet uploaded); {} entries listed with {} requests in {:.2} s",
                        r.added,
                        r.changed,
                        r.removed,
                        r.kept_local,
                        r.listed,
                        r.list_requests,
                        r.took.as_secs_f64()
                    ));
                }
                Event::Error { message } => return Err(message),
                _ => {}
            }
        }
        Err("the mount's daemon closed the connection without an answer".into())
    };
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simfs refresh: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_made_relative_to_the_mount_root() {
        let mp = std::env::temp_dir();
        let canon = std::fs::canonicalize(&mp).unwrap();
        assert_eq!(relative(&mp, Path::new("a/./b")).unwrap(), "a/b");
        assert_eq!(relative(&mp, &canon.join("x/y")).unwrap(), "x/y");
        assert!(relative(&mp, Path::new("/elsewhere/x")).is_err());
        assert!(relative(&mp, Path::new("a/../b")).is_err());
    }
}
