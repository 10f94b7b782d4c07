//! Mount-helper arguments (`mount -t fuse.simfs`, fstab) → `simfs mount` arguments.
//!
//! mount(8) runs `/sbin/mount.fuse.simfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`, and Debian's
//! `mount.fuse3` runs `simfs SOURCE MOUNTPOINT -o OPTIONS` for the `simfs#SOURCE` form. Every
//! `simfs mount` option is also an `-o` option, with `_` or `-` between words
//! (`cache_dir=/mnt/nvme`, `upload-delay=5`, `allow_other`). The standard options are
//! honoured where they mean something for simfs (`ro`, `rw`, `allow_other`, `uid=`, `gid=`,
//! `noexec`, `nonempty`) and accepted and ignored where they are for mount(8) or systemd
//! (`_netdev`, `nofail`, `noauto`, `x-systemd.*`, `defaults`, ...). Anything else is an error
//! naming the option, unless `-s` (sloppy) asks to ignore it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// A long option of `simfs mount`: its name and whether it takes a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flag {
    pub name: String,
    pub takes_value: bool,
}

/// What the helper was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperCall {
    /// `simfs mount ...` arguments (without the program name).
    pub args: Vec<OsString>,
    /// `-f`: parse and check everything, but do not mount.
    pub fake: bool,
}

/// Options mount(8), systemd and fstab use that mean nothing to simfs.
fn ignored(key: &str) -> bool {
    const IGNORED: &[&str] = &[
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "_netdev",
        "nofail",
        "rw",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "async",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "diratime",
        "lazytime",
        "default_permissions",
        "comment",
    ];
    IGNORED.contains(&key) || key.starts_with("x-")
}

/// Whether `args` (without the program name) are a mount helper call rather than a
/// subcommand: `SOURCE MOUNTPOINT ...`.
pub fn is_helper_call(argv0: &OsStr, args: &[OsString], subcommands: &[&str]) -> bool {
    let prog = std::path::Path::new(argv0)
        .file_name()
        .map(|n| n.as_bytes().starts_with(b"mount."))
        .unwrap_or(false);
    let looks_like = args.len() >= 2
        && args[..2].iter().all(|a| !a.as_bytes().starts_with(b"-"))
        && !subcommands.iter().any(|s| args[0] == OsStr::new(s));
    prog || looks_like
}

/// Translates a helper call into `simfs mount` arguments.
pub fn translate(args: &[OsString], flags: &[Flag]) -> Result<HelperCall, String> {
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut fake, mut sloppy) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let o = it.next().ok_or("-o needs a value")?;
                let o = o.to_str().ok_or("mount options must be UTF-8")?;
                options.extend(split_options(o));
            }
            Some(o) if o.starts_with("-o") => options.extend(split_options(&o[2..])),
            Some("-f") => fake = true,
            Some("-s") => sloppy = true,
            // No mtab to write; verbosity comes from SIMFS_LOG.
            Some("-n") | Some("-v") => {}
            Some("-t") | Some("-N") => {
                it.next();
            }
            Some(o) if o.starts_with('-') => return Err(format!("unknown flag {o:?}")),
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(format!(
            "expected SOURCE MOUNTPOINT [-o OPTIONS], got {} operands",
            positional.len()
        ));
    };
    // mount.fuse3's `simfs#SOURCE` form passes the source without the prefix already;
    // accept it either way.
    let source = match source.as_bytes().strip_prefix(b"simfs#") {
        Some(s) => OsStr::from_bytes(s).to_owned(),
        None => source.clone(),
    };
    let mut out: Vec<OsString> = vec!["mount".into()];
    for o in options {
        let (key, value) = match o.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (o.clone(), None),
        };
        let name = key.replace('_', "-");
        match (key.as_str(), &value) {
            ("ro", None) => out.push("--read-only".into()),
            ("nonempty", None) => out.push("--allow-non-empty".into()),
            ("noexec", None) => out.push("--noexec".into()),
            (k, _) if ignored(k) => {}
            _ => match flags.iter().find(|f| f.name == name) {
                Some(f) if f.takes_value => {
                    let v =
                        value.ok_or_else(|| format!("option {key} needs a value ({key}=...)"))?;
                    out.push(format!("--{name}").into());
                    out.push(v.into());
                }
                Some(_) if value.is_none() => out.push(format!("--{name}").into()),
                Some(_) => return Err(format!("option {key} takes no value")),
                None if sloppy => {}
                None => {
                    let mut known: Vec<String> =
                        flags.iter().map(|f| f.name.replace('-', "_")).collect();
                    known.sort();
                    return Err(format!(
                        "unknown mount option {key:?} (simfs options: {})",
                        known.join(", ")
                    ));
                }
            },
        }
    }
    out.push(source);
    out.push(mountpoint.clone());
    Ok(HelperCall { args: out, fake })
}

/// Splits `a,b=c,d` (a value may not contain a comma, as in fstab).
fn split_options(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<Flag> {
        [
            ("cache-dir", true),
            ("credential-file", true),
            ("allow-other", false),
            ("uid", true),
            ("read-only", false),
            ("upload-delay", true),
            ("sync", false),
            ("max-pending", true),
        ]
        .iter()
        .map(|(n, v)| Flag {
            name: n.to_string(),
            takes_value: *v,
        })
        .collect()
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn an_fstab_line_becomes_a_simfs_mount_command() {
        let call = translate(
            &os(&[
                "az://acct/data",
                "/mnt/data",
                "-o",
                "rw,_netdev,nofail,allow_other,cache_dir=/mnt/nvme/simfs,credential_file=/etc/simfs/acct.conf,x-systemd.automount,uid=1000",
            ]),
            &flags(),
        )
        .unwrap();
        assert_eq!(
            call.args,
            os(&[
                "mount",
                "--allow-other",
                "--cache-dir",
                "/mnt/nvme/simfs",
                "--credential-file",
                "/etc/simfs/acct.conf",
                "--uid",
                "1000",
                "az://acct/data",
                "/mnt/data"
            ])
        );
        assert!(!call.fake);
    }

    #[test]
    fn standard_options_map_and_helper_flags_are_understood() {
        let call = translate(
            &os(&[
                "-n",
                "simfs#c",
                "/m",
                "-o",
                "ro,upload-delay=3,nonempty",
                "-f",
            ]),
            &flags(),
        )
        .unwrap();
        assert!(call.fake);
        assert_eq!(
            call.args,
            os(&[
                "mount",
                "--read-only",
                "--upload-delay",
                "3",
                "--allow-non-empty",
                "c",
                "/m"
            ])
        );
    }

    #[test]
    fn sync_and_async_mean_what_mount_8_says() {
        let call = translate(&os(&["c", "/m", "-o", "rw,sync,max_pending=10G"]), &flags()).unwrap();
        assert_eq!(
            call.args,
            os(&["mount", "--sync", "--max-pending", "10G", "c", "/m"])
        );
        // async is the default: nothing to pass.
        let call = translate(&os(&["c", "/m", "-o", "async"]), &flags()).unwrap();
        assert_eq!(call.args, os(&["mount", "c", "/m"]));
    }

    #[test]
    fn unknown_or_malformed_options_fail_with_their_name() {
        let e = translate(&os(&["s", "/m", "-o", "cache_dri=/x"]), &flags()).unwrap_err();
        assert!(
            e.contains("\"cache_dri\"") && e.contains("cache_dir"),
            "{e}"
        );
        let e = translate(&os(&["s", "/m", "-o", "cache_dir"]), &flags()).unwrap_err();
        assert!(e.contains("needs a value"), "{e}");
        let e = translate(&os(&["s", "/m", "-o", "allow_other=1"]), &flags()).unwrap_err();
        assert!(e.contains("takes no value"), "{e}");
        assert!(translate(&os(&["s"]), &flags()).is_err());
        // -s: sloppy, unknown options are ignored.
        assert!(translate(&os(&["s", "/m", "-s", "-o", "whatever"]), &flags()).is_ok());
    }

    #[test]
    fn helper_calls_are_told_from_subcommands() {
        let subs = ["mount", "unmount", "status"];
        let p = OsStr::new("/usr/bin/simfs");
        assert!(is_helper_call(p, &os(&["az://a/b", "/mnt"]), &subs));
        assert!(!is_helper_call(
            p,
            &os(&["mount", "az://a/b", "/mnt"]),
            &subs
        ));
        assert!(!is_helper_call(p, &os(&["--version"]), &subs));
        let helper = OsStr::new("/sbin/mount.fuse.simfs");
        assert!(is_helper_call(helper, &os(&["a", "/m"]), &subs));
    }
}
